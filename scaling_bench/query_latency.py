"""Question latency of the four retrieval methods side by side, under a fixed real-time ingest load:
TTFT p50/p99 and end-to-end answer time, through the Serve HTTP path (the client, streamed answers)
and through the engine directly (Ray calls to the shard actors, no HTTP).

For each method one shard (one GPU) serves --streams streams at --fps frames/s each, with a
question every --question-every s per stream; HTTP and direct run one after the other on the same
runtime, on fresh streams.

    python scaling_bench/query_latency.py --streams 32 --seconds 120                         # GPU
    python scaling_bench/query_latency.py --quick --out /tmp/r                              # CPU, < 2 min
    ray job submit --working-dir . -- python scaling_bench/query_latency.py --quick --out /tmp/r  # --out absolute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from scaling_bench.harness import cli, report  # noqa: E402
from scaling_bench.harness.engines import METHODS, engine_kwargs, runtime_config  # noqa: E402
from scaling_bench.harness.load_gen import LoadSpec, run_load  # noqa: E402
from scaling_bench.harness.serve_stack import Stack, bench_stack  # noqa: E402
from scaling_bench.harness.targets import DirectTarget, HttpTarget  # noqa: E402
from scaling_bench.harness.video_frames import real_frames  # noqa: E402

NAME = "query_latency"
PATHS = ("http", "direct")


def measure(stack: Stack, a: argparse.Namespace, method: str, frames) -> list[dict]:
    cfg = runtime_config(f"ql-{method}", 1, engine_kwargs(method, a.model, a.device, a.window, a.pool_mb))
    url = stack.app(cfg)
    rows = []
    try:
        for path in PATHS:
            spec = LoadSpec(streams=a.streams, seconds=a.seconds, fps=a.fps, question_every_s=a.question_every,
                            max_tokens=a.max_tokens, warmup_s=a.warmup, prefix=f"{method}-{path}")
            target = HttpTarget(url) if path == "http" else DirectTarget(cfg)

            async def go():
                async with target as t:
                    return await run_load(t, spec, frames, not a.no_progress, f"{method} {path}")

            s = asyncio.run(go()).summary()
            rows.append({"method": method, "path": path, **s})
            print(f"  {method:8s} {path:6s}: TTFT p50 {s['ttft']['p50_ms']:6.1f} / p99 {s['ttft']['p99_ms']:6.1f} ms, "
                  f"answer p50 {s['e2e']['p50_ms']:6.1f} / p99 {s['e2e']['p99_ms']:6.1f} ms "
                  f"({s['ttft']['n']} questions, lag p99 {s['lag']['p99_ms']:.0f} ms)", flush=True)
    finally:
        stack.drop(cfg, app=True)
    return rows


def plot(rows, path) -> None:
    plt = report.pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.2
    for j, (p, q) in enumerate([(p, q) for p in PATHS for q in ("p50_ms", "p99_ms")]):
        xs = [i + j * width for i in range(len(methods))]
        for ax, key in zip(axes, ("ttft", "e2e")):
            ax.bar(xs, [next(r[key][q] for r in rows if r["method"] == m and r["path"] == p) for m in methods],
                   width, label=f"{p} {q[:3]}")
    for ax, title in zip(axes, ("TTFT (ms)", "end-to-end answer (ms)")):
        ax.set_xticks([i + 1.5 * width for i in range(len(methods))], methods)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--streams", type=int, default=32, help="ingesting streams (the fixed load)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per wall second per stream")
    p.add_argument("--seconds", type=float, default=120.0, help="wall seconds per (method, path)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds not counted at the start")
    p.add_argument("--question-every", type=float, default=5.0, help="seconds between questions, per stream")
    p.add_argument("--from-json", default=None, help="re-render the table and plot of an earlier run's JSON")
    a = p.parse_args(argv)
    cli.resolve(a)
    if a.quick:  # 2 streams at an accelerated 4 frames/s, a question per stream every second
        a.streams, a.fps, a.seconds, a.warmup, a.question_every = 2, 4.0, 5.0, 1.0, 0.5
        if "--methods" not in " ".join(argv or __import__("sys").argv):  # each method costs a runtime start
            a.methods = "cluster,full"
    if a.from_json:  # re-render the table and plot of an earlier run (e.g. one from a GPU machine)
        publish(a.out, json.loads(Path(a.from_json).read_text()))
        return 0
    frames, source = real_frames(a.size, frames_file=a.frames_file)
    t0 = time.perf_counter()
    result = {"bench": NAME, "machine": report.machine(), "model": a.model, "engine_device": a.device,
              "video": source, "frame_px": a.size, "streams": a.streams, "fps_per_stream": a.fps,
              "seconds": a.seconds, "question_every_s": a.question_every, "max_tokens": a.max_tokens,
              "window_tokens": a.window, "quick": a.quick, "wall_s": 0.0, "rows": []}
    with bench_stack(num_gpus=1) as stack:
        for m in a.methods.split(","):
            result["rows"] += measure(stack, a, m, frames)
            result["wall_s"] = time.perf_counter() - t0
            table = publish(a.out, result)  # after every method: a cut-off run keeps what it measured
    report.done(a.out, NAME, table, result["wall_s"])
    return 0


def publish(out: str, result: dict) -> list[str]:
    """The run's table, written with its JSON and PNG (`report.publish`)."""
    r0 = result
    table = [f"Machine: {r0['machine']['device']}; model {r0['model']} on {r0['engine_device']}; one shard; load: "
             f"{r0['streams']} streams x {r0['fps_per_stream']:g} frame/s of {r0['video']} ({r0['frame_px']}px), a "
             f"question every {r0['question_every_s']:g} s per stream, {r0['max_tokens']} answer tokens, "
             f"{r0['seconds']:g} s per row",
             "", "| method | path | questions | TTFT p50 ms | TTFT p99 ms | answer p50 ms | answer p99 ms "
             "| ingest lag p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        table.append(f"| {r['method']} | {r['path']} | {r['ttft']['n']} | {r['ttft']['p50_ms']:.1f} | "
                     f"{r['ttft']['p99_ms']:.1f} | {r['e2e']['p50_ms']:.1f} | {r['e2e']['p99_ms']:.1f} | "
                     f"{r['lag']['p99_ms']:.0f} |")
    return report.publish(out, NAME, result, table, plot)


if __name__ == "__main__":
    raise SystemExit(main())
