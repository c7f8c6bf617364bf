"""What durability costs and how fast a stream is rebuilt, without Ray:

1. append: one frame batch (--batch JPEG frames of --size px, as a client sends them) per append
   to a `DiskFrameLog`, for each fsync policy: appends/s, MB/s, p50/p99 latency of one append
   (what an acknowledgement waits for the log);
2. replay: a --frames-frame log read back, JPEG-decoded and appended to the tests' fake engine
   (`log_replay.replay`, groups of 64): frames/s of the runtime's part of a rebuild. With a real
   engine, a rebuild takes at least frames / the engine's ingest rate on top.

    python scaling_bench/frame_log_cost.py                       # this machine's disk, ~20 s
    python scaling_bench/frame_log_cost.py --root /mnt/nfs/tmp   # shared storage
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import tempfile
import time

import numpy as np
from PIL import Image


def jpeg_frames(n: int, size: int) -> list:
    from mosaic_ray.runtime.frame_codec import inspect

    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, size * size * 3).reshape(size, size, 3)
    out = []
    for i in range(n):
        img = np.clip(base + rng.normal(0, 20, base.shape) + 7 * i, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=85)
        out.append(inspect("jpeg", buf.getvalue(), 1 << 30))
    return out


def measure_appends(root: str, policy: str, frames: list, batch: int, appends: int) -> dict:
    from mosaic_ray.runtime.frame_log import FrameRecord
    from mosaic_ray.runtime.frame_log_disk import DiskFrameLog

    log = DiskFrameLog(f"{root}/{policy}", policy, 100)
    lat, nbytes = [], 0
    start = time.perf_counter()
    for seq in range(appends):
        chunk = tuple(frames[(seq * batch + i) % len(frames)] for i in range(batch))
        rec = FrameRecord(seq, chunk, tuple(float(seq * batch + i) for i in range(batch)))
        t0 = time.perf_counter()
        log.append("bench", [rec])
        lat.append(time.perf_counter() - t0)
        nbytes += sum(len(f.data) for f in chunk)
    elapsed = time.perf_counter() - start
    log.close()
    lat.sort()
    return {"fsync": policy, "appends_per_s": round(appends / elapsed, 1),
            "mb_per_s": round(nbytes / elapsed / 1e6, 1),
            "p50_ms": round(1e3 * lat[len(lat) // 2], 3), "p99_ms": round(1e3 * lat[int(len(lat) * 0.99)], 3)}


def measure_replay(root: str, frames: list, total: int, batch: int) -> dict:
    from mosaic_ray.runtime.frame_codec import decode_all
    from mosaic_ray.runtime.frame_log import FrameRecord, OpenRecord
    from mosaic_ray.runtime.frame_log_disk import DiskFrameLog
    from mosaic_ray.runtime.log_replay import replay
    from tests.runtime.fake_engine import FakeEngine

    log = DiskFrameLog(f"{root}/replay", "never")
    log.append("s", [OpenRecord(0.0)])
    for seq in range(total // batch):
        chunk = tuple(frames[(seq * batch + i) % len(frames)] for i in range(batch))
        log.append("s", [FrameRecord(seq, chunk, tuple(float(seq * batch + i) for i in range(batch)))])
    log.sync()
    engine = FakeEngine()
    engine.open_stream("s")

    async def go():
        t0 = time.perf_counter()
        records = list(log.read("s"))
        t_read = time.perf_counter() - t0

        async def append(f, t):
            return engine.append_frames("s", f, t)

        async def text(x, ts):
            engine.append_text("s", x, ts)

        async def decode(f):
            return await asyncio.to_thread(decode_all, f)

        done = await replay(records, append, text, decode, 64)
        return done, t_read, time.perf_counter() - t0

    done, t_read, elapsed = asyncio.run(go())
    log.close()
    return {"frames": done.frames, "read_s": round(t_read, 3), "seconds": round(elapsed, 2),
            "frames_per_s": round(done.frames / elapsed, 1), "engine_calls": done.engine_calls}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="directory for the logs (default: a temp dir)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--appends", type=int, default=300)
    p.add_argument("--frames", type=int, default=3600, help="frames in the replayed log (1 h at 1 fps)")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="flc-", dir=a.root)
    try:
        frames = jpeg_frames(32, a.size)
        kb = sum(len(f.data) for f in frames) / len(frames) / 1e3
        rows = [measure_appends(root, pol, frames, a.batch, a.appends) for pol in ("never", "interval", "always")]
        rep = measure_replay(root, frames, a.frames, a.batch)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"jpeg_kb": round(kb, 1), "batch": a.batch, "appends": rows, "replay": rep}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
