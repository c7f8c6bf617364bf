"""Aggregate throughput against the number of shards (one GPU each): frames/s ingested and
questions/s answered, and efficiency = throughput(N) / (N x throughput(1)).

For each N in 1..--max-shards a runtime of N shards serves N x --streams-per-shard streams; each
stream pushes real video frames back to back (--batch frames per push, the next push once the
last is acknowledged) and asks a question every --question-every s. Through the shard actors
directly by default (--path http: through Serve, one ingress replica per shard). On a CPU machine
the shards are logical GPUs sharing the cores, and the load generator shares them too.

    python scaling_bench/shard_scaling.py --max-shards 8                                   # 8-GPU host
    python scaling_bench/shard_scaling.py --quick --out /tmp/r                             # CPU, < 2 min
    ray job submit --working-dir . -- python scaling_bench/shard_scaling.py --quick --out /tmp/r  # --out absolute
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from scaling_bench.harness import cli, report  # noqa: E402
from scaling_bench.harness.engines import engine_kwargs, runtime_config  # noqa: E402
from scaling_bench.harness.load_gen import LoadSpec, run_load  # noqa: E402
from scaling_bench.harness.serve_stack import Stack, bench_stack  # noqa: E402
from scaling_bench.harness.targets import DirectTarget, HttpTarget  # noqa: E402
from scaling_bench.harness.video_frames import real_frames  # noqa: E402

NAME = "shard_scaling"


def measure(stack: Stack, a: argparse.Namespace, n: int, frames) -> dict:
    cfg = runtime_config(f"ss-{n}", n, engine_kwargs(a.method, a.model, a.device, a.window, a.pool_mb))
    url = stack.app(cfg, replicas=n) if a.path == "http" else (stack.runtime(cfg) or None)
    try:
        spec = LoadSpec(streams=n * a.streams_per_shard, seconds=a.seconds, fps=None, batch_frames=a.batch,
                        question_every_s=a.question_every, max_tokens=a.max_tokens, prefix=f"ss{n}")
        target = HttpTarget(url) if a.path == "http" else DirectTarget(cfg)

        async def go():
            async with target as t:
                return await run_load(t, spec, frames, not a.no_progress, f"{n} shard(s)")

        return {"shards": n, **asyncio.run(go()).summary()}
    finally:
        stack.drop(cfg, app=a.path == "http")


def plot(rows, path) -> None:
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["shards"] for r in rows]
    axes[0].plot(xs, [r["ingest_fps"] for r in rows], "o-", label="measured")
    axes[0].plot(xs, [x * rows[0]["ingest_fps"] for x in xs], "--", label="linear")
    axes[0].set_title("frames/s ingested")
    axes[1].plot(xs, [r["questions_per_s"] for r in rows], "o-", label="measured")
    axes[1].plot(xs, [x * rows[0]["questions_per_s"] for x in xs], "--", label="linear")
    axes[1].set_title("questions/s answered")
    for ax in axes:
        ax.set_xlabel("shards")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--method", default="cluster", help="retrieval method of every shard")
    p.add_argument("--max-shards", type=int, default=None, help="default: the GPUs of this machine")
    p.add_argument("--streams-per-shard", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="frames per push")
    p.add_argument("--seconds", type=float, default=60.0, help="wall seconds per shard count")
    p.add_argument("--question-every", type=float, default=5.0, help="seconds between questions, per stream")
    p.add_argument("--path", choices=["direct", "http"], default="direct")
    a = p.parse_args(argv)
    cli.resolve(a)
    if a.quick:  # 1..3 logical shards, 2 streams each, 5 s per point
        a.max_shards = a.max_shards or 3
        a.streams_per_shard, a.batch, a.seconds, a.question_every = 2, 4, 5.0, 1.0
    a.max_shards = a.max_shards or max(1, report.gpu_count())
    frames, source = real_frames(a.size, frames_file=a.frames_file)
    t0 = time.perf_counter()
    rows = []
    with bench_stack(num_gpus=a.max_shards) as stack:
        for n in range(1, a.max_shards + 1):
            rows.append(measure(stack, a, n, frames))
            r = rows[-1]
            print(f"  {n} shard(s): {r['ingest_fps']:7.1f} frames/s, {r['questions_per_s']:5.2f} questions/s, "
                  f"TTFT p99 {r['ttft']['p99_ms']:.0f} ms, errors {r['errors']}", flush=True)
    base = rows[0]
    for r in rows:
        r["efficiency_frames"] = r["ingest_fps"] / (r["shards"] * base["ingest_fps"]) if base["ingest_fps"] else 0.0
        r["efficiency_questions"] = (r["questions_per_s"] / (r["shards"] * base["questions_per_s"])
                                     if base["questions_per_s"] else 0.0)
    mach = report.machine()
    cards = report.gpu_count()
    result = {"bench": NAME, "machine": mach, "cards": cards, "model": a.model, "engine_device": a.device, "method": a.method,
              "path": a.path, "video": source, "frame_px": a.size, "streams_per_shard": a.streams_per_shard,
              "batch_frames": a.batch, "seconds": a.seconds, "question_every_s": a.question_every,
              "max_tokens": a.max_tokens, "quick": a.quick, "wall_s": time.perf_counter() - t0, "rows": rows}
    where = f"{mach['device']} x {cards}, one shard per GPU" if mach["gpu"] else f"{mach['device']}, logical GPUs"
    table = [f"Machine: {where}; model {a.model} on {a.device}; {a.method} retrieval; path {a.path}; "
             f"{a.streams_per_shard} streams per shard pushing {a.batch}-frame batches of {source} ({a.size}px) back "
             f"to back, a question every {a.question_every:g} s per stream; {a.seconds:g} s per point",
             "", "| shards | frames/s | efficiency (frames) | questions/s | efficiency (questions) | TTFT p50 ms "
             "| TTFT p99 ms | errors |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['shards']} | {r['ingest_fps']:.1f} | {r['efficiency_frames']:.2f} | "
                     f"{r['questions_per_s']:.2f} | {r['efficiency_questions']:.2f} | {r['ttft']['p50_ms']:.0f} | "
                     f"{r['ttft']['p99_ms']:.0f} | {r['errors']} |")
    report.publish(a.out, NAME, result, table, plot)
    report.done(a.out, NAME, table, result["wall_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
