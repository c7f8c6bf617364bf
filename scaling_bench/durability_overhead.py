"""What frame logs cost ingest: frames/s acknowledged by one shard with durability off, and on
under each fsync policy, the same load each time (--streams streams pushing --batch-frame JPEG
batches back to back for --seconds through the shard actor, as the ingress does).

    python scaling_bench/durability_overhead.py                     # fake engine, ~1 min
    python scaling_bench/durability_overhead.py --rounds 3          # alternate the configs 3 times
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

FAKE = "tests.runtime.fake_engine:FakeEngine"
CONFIGS = {"off": {"enabled": False}, "never": {"fsync": "never"}, "interval": {"fsync": "interval"},
           "always": {"fsync": "always"}}


def jpeg_frames(n: int, size: int) -> list:
    from mosaic_ray.runtime.durability.frame_codec import inspect

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
        out.append(inspect("jpeg", buf.getvalue(), 1 << 30))
    return out


async def push(cfg, streams: int, batch: int, seconds: float, frames: list) -> float:
    from mosaic_ray.runtime.bootstrap import connect_runtime
    from mosaic_ray.serve.directory import StreamDirectory

    await connect_runtime(cfg)
    d = await StreamDirectory.connect(cfg)
    sids = [f"o{i}" for i in range(streams)]
    for sid in sids:
        await d.ask_router("create_stream", sid)
    acked = 0
    deadline = time.monotonic() + seconds

    async def one(sid: str) -> None:
        nonlocal acked
        seq = 0
        while time.monotonic() < deadline:
            stamps = [float(seq * batch + i) for i in range(batch)]
            await d.call(sid, "append_frames", seq, [frames[(seq + i) % len(frames)] for i in range(batch)], stamps)
            acked += batch
            seq += 1

    start = time.monotonic()
    await asyncio.gather(*(one(s) for s in sids))
    return acked / (time.monotonic() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--engine", default=FAKE)
    a = p.parse_args()

    from mosaic_ray.runtime.bootstrap import shutdown_runtime
    from mosaic_ray.runtime.config import RuntimeConfig
    from scaling_bench.harness.ray_env import start_ray

    session = start_ray(num_gpus=1)
    frames = jpeg_frames(16, a.size)
    root = tempfile.mkdtemp(prefix="dur-")
    results: dict[str, list[float]] = {k: [] for k in CONFIGS}
    try:
        for r in range(a.rounds):
            for name, dur in CONFIGS.items():
                cfg = RuntimeConfig(name=f"dur-{name}-{r}", num_shards=1, engine={"factory": a.engine},
                                    shard={"num_gpus": 1, "num_cpus": 0, "max_pending_frames": 4096},
                                    router={"health_interval_s": 0}, durability={"root": root, **dur})
                try:
                    results[name].append(round(asyncio.run(push(cfg, a.streams, a.batch, a.seconds, frames)), 1))
                finally:
                    shutdown_runtime(cfg, forget_streams=True)
                print(f"round {r} {name:9s} {results[name][-1]:8.1f} frames/s", flush=True)
    finally:
        session.close()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"streams": a.streams, "batch": a.batch, "jpeg_px": a.size, "frames_per_s": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
