"""Reliability under load through HTTP: N streams ingest (paced JPEG batches) and ask questions for
a fixed time while one shard actor is killed part-way; then frames acknowledged vs stored, answer
p99 (retries included) and the server's 503 rate (`scaling_bench.harness.reliability_load`).

Starts a private Ray cluster with the Serve app (fake engine by default: the figures are the
runtime's, not a model's), or joins the one a `ray job submit` points at.

    python scaling_bench/reliability_load.py --quick                 # CPU, ~30 s with start-up
    python scaling_bench/reliability_load.py --streams 16 --seconds 60 --kill-after 20 --out /tmp/r
    python scaling_bench/reliability_load.py --quick --no-kill       # the same load, nothing killed
    python scaling_bench/reliability_load.py --quick --model tiny    # the real engine (tiny model, CPU)

With --model the shards run the real engine (cluster retrieval); --gpus N gives the private
cluster N GPUs shared by the shards (2 shards on 1 GPU: half a GPU each, each with its own
--kv-tokens device pool). The GPU recovery table of docs/reliability.md:

    python scaling_bench/reliability_load.py --model 7b-shape --device cuda --gpus 1 --streams 16 \
        --fps 1 --batch 1 --question-every 10 --seconds 140 --kill-after 110 --snapshot-every 40 \
        --frame-px 224 --engine-frame-size 224 --pool-mb 32768 --kv-tokens 100000 --out /tmp/r
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

FAKE = "tests.runtime.fake_engine:FakeEngine"


def table(out: dict, a: argparse.Namespace) -> list[str]:
    """The run as one row of docs/reliability.md's recovery table."""
    k, m = out["killed"], out["machine"]
    model = f"{a.model} on {a.device}" if a.model else "fake engine"
    rec = "-" if not k else (f"{k.get('recovery_s')} s (p50 {k.get('recovery_p50_s')} s)"
                             if k.get("recovery_s") is not None else f"never: {k.get('never_answered')}")
    return [f"Machine: {m['device']}; {model}; {a.shards} shards on {a.gpus if a.gpus is not None else a.shards} "
            f"GPU(s); {a.streams} streams at {a.fps:g} frames/s in {a.batch}-frame batches, a question per stream "
            f"every {a.question_every:g} s; snapshot every {out['durability'].get('snapshot_every_frames', 600)} "
            f"frames; {a.seconds:g} s, shard:0 killed at {a.kill_after:g} s",
            "", "| streams on the killed shard | recovery (kill -> each answers again) | frames acked | frames stored "
            "| answers | answer p50 / p99 ms | 503 rate |", "|---|---|---|---|---|---|---|",
            f"| {k.get('affected_streams', '-')} | {rec} | {out['frames_acked']} | {out['frames_stored']} | "
            f"{out['answers']} | {out['answer_ms']['p50']} / {out['answer_ms']['p99']} | {out['rate_503']} |",
            *rebuild_lines(k)]


def rebuild_lines(killed: dict) -> list[str]:
    """Where each recovery episode's time went: the router's per-stream rebuild figures
    (`RecoveryManager`: wait for a turn, then the target's read / import / replay)."""
    status = (killed.get("runtime") or {}).get("recovery_status") or {}
    lines = []
    for ep in status.get("episodes", []):
        rows = ep.get("rebuilds") or []
        if not rows:
            continue
        def stat(key, how=max):
            vals = [r[key] for r in rows if key in r]
            return round(how(vals), 2) if vals else "-"
        targets = sorted({r["target"] for r in rows})
        lines.append(f"\nEpisode from {ep['from']}: {len(rows)} streams rebuilt on {', '.join(targets)} in "
                     f"{round(ep['seconds'] or 0, 2)} s; per stream (max / sum): waited {stat('waited_s')} s, "
                     f"read {stat('read_s')} / {stat('read_s', sum)} s, import {stat('import_s')} / "
                     f"{stat('import_s', sum)} s, replay {stat('replay_s')} / {stat('replay_s', sum)} s; "
                     f"snapshot bytes {stat('snapshot_bytes', sum)}, frames replayed {stat('frames', sum)}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 streams, 8 s, kill at 3 s")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--fps", type=float, default=8.0, help="frames/s per stream")
    p.add_argument("--batch", type=int, default=4, help="frames per push")
    p.add_argument("--question-every", type=float, default=2.0, help="seconds between questions per stream")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--kill-after", type=float, default=20.0, help="seconds into the load a shard is killed")
    p.add_argument("--no-kill", action="store_true")
    p.add_argument("--engine", default=FAKE, help="engine factory (default: the tests' fake engine)")
    p.add_argument("--fsync", default="interval", choices=["always", "interval", "never"])
    p.add_argument("--model", default=None, help="run the real engine with this model (default: the fake engine)")
    p.add_argument("--device", default="cpu", help="the real engine's device (with --model)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs of a private cluster (default: one logical GPU "
                                                            "per shard); fewer than --shards: they share them")
    p.add_argument("--kv-tokens", type=int, default=200_000, help="device K/V pool per shard, tokens (with --model)")
    p.add_argument("--pool-mb", type=int, default=1024, help="host pool per shard, MiB (with --model; a GPU run: 32768)")
    p.add_argument("--frame-px", type=int, default=64, help="side of the JPEG frames the clients send")
    p.add_argument("--engine-frame-size", type=int, default=None,
                   help="EngineConfig.frame_size (with --model; 7b-shape: 336 = 144 tokens a frame, 224 = 64)")
    p.add_argument("--probe-timeout", type=float, default=180.0, help="after the kill: seconds a stream may take to "
                                                                      "answer again before it counts as lost")
    p.add_argument("--ray-logs", default=None, help="copy the private Ray's logs (router, shards) here at the end")
    p.add_argument("--snapshot-every", type=int, default=None,
                   help="DurabilitySpec.snapshot_every_frames (default: the runtime's, 600)")
    p.add_argument("--out", default=None, help="directory for reliability_load.json (default: none, printed only; "
                                                "absolute under `ray job submit`)")
    a = p.parse_args()
    from scaling_bench.harness.cli import out_dir

    a.out = a.out and out_dir(a.out)
    if a.quick:
        a.streams, a.seconds, a.kill_after, a.question_every = 4, 8.0, 3.0, 1.0

    import ray

    from scaling_bench.harness import report
    from scaling_bench.harness.engines import engine_kwargs
    from scaling_bench.harness.reliability_load import (
        ReliabilityLoadSpec,
        run_reliability_load,
    )
    from scaling_bench.harness.serve_stack import bench_stack

    log_root = tempfile.mkdtemp(prefix="mosaic-log-")
    gpus = a.gpus if a.gpus is not None else a.shards
    engine = {"factory": a.engine}
    if a.model is not None:
        kwargs = engine_kwargs("cluster", a.model, a.device, 2048, a.pool_mb)
        engine = {"kwargs": {**kwargs, "kv_pool": {"capacity_tokens": a.kv_tokens}}}
        if a.engine_frame_size:
            engine["kwargs"]["frame_size"] = a.engine_frame_size
    durability = {"root": log_root, "fsync": a.fsync}
    if a.snapshot_every is not None:
        durability["snapshot_every_frames"] = a.snapshot_every
    cfg = {"name": "reliability", "num_shards": a.shards, "engine": engine,
           "shard": {"num_gpus": min(1.0, gpus / a.shards), "num_cpus": 0, "max_pending_frames": 1024},
           "router": {"health_interval_s": 1.0},
           "durability": durability}
    spec = ReliabilityLoadSpec(streams=a.streams, seconds=a.seconds, fps=a.fps, batch_frames=a.batch,
                               question_every_s=a.question_every, frame_size=a.frame_px, probe_timeout_s=a.probe_timeout,
                               kill_after_s=None if a.no_kill else a.kill_after)

    async def inspect() -> dict:
        ns = "mosaic_ray"
        router = ray.get_actor(f"{cfg['name']}:router", namespace=ns)
        status = await router.recovery_status.remote()
        snaps = {}
        for i in range(a.shards):
            try:
                snaps[f"shard:{i}"] = await ray.get_actor(f"{cfg['name']}:shard:{i}", namespace=ns).snapshot_stats.remote()
            except Exception as exc:  # the killed one, unless replaced
                snaps[f"shard:{i}"] = f"{type(exc).__name__}"
        return {"recovery_status": status, "snapshots": snaps}

    async def kill() -> str:
        name = f"{cfg['name']}:shard:0"
        ray.kill(ray.get_actor(name, namespace="mosaic_ray"), no_restart=True)
        return name

    try:
        with bench_stack(num_gpus=gpus, keep_logs=a.ray_logs) as stack:
            try:
                out = asyncio.run(run_reliability_load(stack.app(cfg), spec, kill, inspect))
            finally:
                stack.drop(cfg, app=True)
    finally:
        shutil.rmtree(log_root, ignore_errors=True)
    out["engine"] = engine
    out["durability"] = {k: v for k, v in durability.items() if k != "root"}
    out["machine"] = report.machine()
    report.show_json(a.out, "reliability_load", out)
    if a.out:
        (a.out / "reliability_load.md").write_text("\n".join(table(out, a)) + "\n")
    ok = out["errors"] == 0 and out["frames_acked"] == out["frames_stored"]
    print("OK: every acknowledged frame stored" if ok else "FAILED: see lost_streams / first_errors")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
