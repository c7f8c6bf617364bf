"""How many real-time streams one GPU (one shard) carries, per retrieval method.

Streams of real video frames (1 frame/s by default, pushed through the HTTP client as a camera
would) with questions at a fixed rate per stream; the number of streams is ramped until ingest
falls behind real time (lag p99 > --max-lag-s) or TTFT p99 > --max-ttft-s. Reported: the most
streams sustained, per method, with the lag and TTFT of every step.

    python scaling_bench/streams_per_gpu.py --methods cluster,token --ramp 16,32,48,64,96,128   # GPU
    python scaling_bench/streams_per_gpu.py --quick --out /tmp/r                            # CPU, < 2 min
    python scaling_bench/streams_per_gpu.py --methods cluster --video vtest --pruning both  # pruning off vs on
    ray job submit --working-dir . -- python scaling_bench/streams_per_gpu.py --quick --out /tmp/r  # --out absolute
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

NAME = "streams_per_gpu"


def ramp_method(stack: Stack, a: argparse.Namespace, method: str, frames, prune: bool = False) -> dict:
    kwargs = engine_kwargs(method, a.model, a.device, a.window, a.pool_mb)
    if prune:  # redundant-frame pruning before the encoder, every stream (engine/frame_pruner.py)
        kwargs["pruning"] = {"enabled": True, **({"threshold": a.prune_threshold} if a.prune_threshold else {})}
    label = f"{method}+prune" if prune else method
    cfg = runtime_config(f"spg-{method}{'-prune' if prune else ''}", 1, kwargs)
    url = stack.app(cfg) if a.path == "http" else (stack.runtime(cfg) or None)
    steps, best = [], 0
    try:
        for n in [int(x) for x in a.ramp.split(",")]:
            spec = LoadSpec(streams=n, seconds=a.seconds, fps=a.fps, question_every_s=a.question_every,
                            max_tokens=a.max_tokens, warmup_s=a.warmup,
                            prefix=f"{method}{'-prune' if prune else ''}-{n}")
            target = HttpTarget(url) if a.path == "http" else DirectTarget(cfg)

            async def go():
                async with target as t:
                    return await run_load(t, spec, frames, not a.no_progress, f"{label} x{n}")

            before = stack.shard_metrics(cfg)[0]
            busy0, t0 = before.get("busy_s_total", 0.0), time.perf_counter()
            res = asyncio.run(go())
            shard = stack.shard_metrics(cfg)[0]
            # the engine's step mix over the point: its step counters' growth (steps, tokens, seconds)
            mix = {k[len("step_"):-len("_total")]: shard[k] - before.get(k, 0)
                   for k in shard if k.startswith("step_") and k.endswith("_total")}
            busy = (shard.get("busy_s_total", 0.0) - busy0) / (time.perf_counter() - t0)
            ok = res.sustained(a.max_lag_s, a.max_ttft_s)
            # the engine's parts of TTFT over the point's last 30 s (the shard's engine: `ttft_parts`)
            parts = shard.get("ttft_parts")
            steps.append({**res.summary(), "sustained": ok, "engine_busy_share": busy, "engine_ttft_parts": parts,
                          "engine_step_mix": mix})
            s = steps[-1]
            print(f"  {label:14s} {n:4d} streams: lag p99 {s['lag']['p99_ms']:7.0f} ms, TTFT p50/p99 "
                  f"{s['ttft']['p50_ms']:5.0f}/{s['ttft']['p99_ms']:5.0f} ms, answer p50/p99 {s['e2e']['p50_ms']:5.0f}/"
                  f"{s['e2e']['p99_ms']:5.0f} ms, {s['ingest_fps']:6.1f} frames/s, engine busy {busy:4.0%} "
                  f"-> {'ok' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if parts and parts.get("n"):
                print("  " + " " * 14 + "      engine TTFT parts p50/p99: " + ", ".join(
                    f"{k} {parts[k]['p50_ms']:.0f}/{parts[k]['p99_ms']:.0f} ms" for k in ("start", "queue", "prefill")),
                    flush=True)
            if not ok:
                break
            best = n
    finally:
        stack.drop(cfg, app=a.path == "http")
    return {"method": label, "pruning": prune, "max_streams": best,
            "ramp_exhausted": bool(steps) and steps[-1]["sustained"], "steps": steps}


def plot(rows, path) -> None:
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        xs = [s["streams"] for s in r["steps"]]
        axes[0].plot(xs, [s["lag"]["p99_ms"] for s in r["steps"]], "o-", label=r["method"])
        axes[1].plot(xs, [s["ttft"]["p99_ms"] for s in r["steps"]], "o-", label=r["method"])
    for ax, title in zip(axes, ("ingest lag p99 (ms)", "TTFT p99 (ms)")):
        ax.set_xlabel("concurrent real-time streams")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ramp", default="8,16,32,48,64,80,96,128", help="stream counts tried in order")
    p.add_argument("--fps", type=float, default=1.0, help="frames per wall second per stream (real time: 1)")
    p.add_argument("--seconds", type=float, default=60.0, help="wall seconds per ramp step")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of each step not counted")
    p.add_argument("--question-every", type=float, default=10.0, help="seconds between questions, per stream")
    p.add_argument("--max-lag-s", type=float, default=2.0, help="ingest lag p99 beyond this: behind real time")
    p.add_argument("--max-ttft-s", type=float, default=1.0, help="TTFT p99 beyond this: not sustained")
    p.add_argument("--path", choices=["http", "direct"], default="http")
    p.add_argument("--from-json", default=None, help="re-render the table and plot of an earlier run's JSON")
    p.add_argument("--video", default=None,
                   help="a clip name (vtest, bikes, bigbuckbunny, ...: mosaic_ray.video.sample_videos) or a file; "
                        "default: the sample video")
    p.add_argument("--video-frames", type=int, default=48, help="frames decoded from --video (cycled per stream)")
    p.add_argument("--video-fps", type=float, default=4.0,
                   help="frames per second of video sampled from --video (with pruning, what counts is the scene "
                        "change between consecutive frames: 1 matches a 1 frame/s camera)")
    p.add_argument("--pruning", choices=["off", "on", "both"], default="off",
                   help="redundant-frame pruning in the engine: off, on, or each method both ways")
    p.add_argument("--prune-threshold", type=float, default=None, help="pruning threshold (default: the engine's)")
    a = p.parse_args(argv)
    cli.resolve(a)
    if a.quick:  # accelerated clock (4 frames/s per stream), short steps, a small ramp
        given = " ".join(argv or __import__("sys").argv)
        a.fps, a.seconds, a.warmup, a.question_every = 4.0, 4.0, 1.0, 1.0
        if "--ramp" not in given:
            a.ramp = "2,8,24"
        if "--methods" not in given:
            a.methods = "cluster,full"
    if a.from_json:  # re-render the table and plot of an earlier run (e.g. one from a GPU machine)
        result = json.loads(Path(a.from_json).read_text())
        publish(a.out, result)
        return 0
    frames, source = real_frames(a.size, n=a.video_frames, fps=a.video_fps, frames_file=a.frames_file, video=a.video)
    t0 = time.perf_counter()
    result = {"bench": NAME, "machine": report.machine(), "model": a.model, "engine_device": a.device,
              "path": a.path, "video": source, "frame_px": a.size, "fps_per_stream": a.fps,
              "seconds_per_step": a.seconds, "question_every_s": a.question_every, "max_tokens": a.max_tokens,
              "max_lag_s": a.max_lag_s, "max_ttft_s": a.max_ttft_s, "window_tokens": a.window, "quick": a.quick,
              "pruning": a.pruning, "prune_threshold": a.prune_threshold,
              "wall_s": 0.0, "rows": []}
    prunes = {"off": [False], "on": [True], "both": [False, True]}[a.pruning]
    with bench_stack(num_gpus=1) as stack:
        for m in a.methods.split(","):
            for prune in prunes:
                result["rows"].append(ramp_method(stack, a, m, frames, prune))
                result["wall_s"] = time.perf_counter() - t0
                table = publish(a.out, result)  # after every run: a cut-off run keeps what it measured
    report.done(a.out, NAME, table, result["wall_s"])
    return 0


def publish(out: str, result: dict) -> list[str]:
    """The run's table, written with its JSON and PNG (`report.publish`)."""
    r0 = result
    table = [f"Machine: {r0['machine']['device']}; model {r0['model']} on {r0['engine_device']}; path {r0['path']}; "
             f"{r0['frame_px']}px frames of {r0['video']} at {r0['fps_per_stream']:g} frame/s per stream; a question "
             f"every {r0['question_every_s']:g} s per stream; {r0['seconds_per_step']:g} s per step; sustained = lag "
             f"p99 <= {r0['max_lag_s']:g} s and TTFT p99 <= {r0['max_ttft_s']:g} s",
             "", "| method | max streams sustained | at max: lag p99 ms | TTFT p50 ms | TTFT p99 ms | answer p50 ms "
             "| answer p99 ms | frames/s | engine busy | first failing step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ok = [s for s in r["steps"] if s["sustained"]]
        bad = [s for s in r["steps"] if not s["sustained"]]
        at = ok[-1] if ok else None
        fail = (f"{bad[0]['streams']} (lag p99 {bad[0]['lag']['p99_ms']:.0f} ms, TTFT p99 {bad[0]['ttft']['p99_ms']:.0f} ms"
                f"{', errors' if bad[0]['errors'] else ''})") if bad else "none (ramp exhausted)"
        busy = at.get("engine_busy_share") if at else None
        cells = (f"{at['lag']['p99_ms']:.0f} | {at['ttft']['p50_ms']:.0f} | {at['ttft']['p99_ms']:.0f} | "
                 f"{at['e2e']['p50_ms']:.0f} | {at['e2e']['p99_ms']:.0f} | {at['ingest_fps']:.1f} | "
                 f"{'-' if busy is None else f'{busy:.0%}'}") if at else "- | - | - | - | - | - | -"
        table.append(f"| {r['method']} | {r['max_streams']}{'+' if r['ramp_exhausted'] else ''} | {cells} | {fail} |")
    return report.publish(out, NAME, result, table, plot)


if __name__ == "__main__":
    raise SystemExit(main())
