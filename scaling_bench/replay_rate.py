"""How fast a stream is rebuilt from its frame log by a real engine, against how fast the same
frames were ingested live: the number that decides whether a dead shard's streams answer again
within 30 s (docs/reliability.md). No Ray needed (runs on the GPU machine as it is).

For S streams of F frames (JPEG, --size px, as clients send them):
1. live: the decoded frames appended as the shard does (`StreamEngine.ingest_frames`, `--batch`
   frames per stream per call; the engine's step loop merges the streams' frames per forward);
2. the same batches written to a `DiskFrameLog`, then every stream rebuilt in a fresh engine by
   `log_replay.replay` (read, JPEG decode one group ahead, the same cross-stream batching), as
   `ShardActor.recover_stream` does for S streams at once; then one stream alone.
Checks that each rebuilt stream holds what the live one held (frames, tokens).

    python scaling_bench/replay_rate.py --model 7b-shape --device cuda --streams 8 --frames 120
    python scaling_bench/replay_rate.py --quick          # CPU, tiny model, ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from PIL import Image

try:
    import ray  # noqa: F401
except ImportError:  # a GPU machine without Ray; runtime.errors only needs this name
    stub, exceptions = types.ModuleType("ray"), types.ModuleType("ray.exceptions")
    exceptions.RayTaskError = type("RayTaskError", (Exception,), {"cause": None})
    stub.exceptions = exceptions
    sys.modules.update({"ray": stub, "ray.exceptions": exceptions})

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from mosaic_ray.engine.stream_engine import StreamEngine  # noqa: E402
from mosaic_ray.runtime.durability.frame_codec import decode_all, inspect  # noqa: E402
from mosaic_ray.runtime.durability.frame_log import FrameRecord, OpenRecord  # noqa: E402
from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog  # noqa: E402
from mosaic_ray.runtime.durability.log_replay import replay  # noqa: E402
from scaling_bench.harness import report  # noqa: E402
from scaling_bench.harness.timing import sync  # noqa: E402


def jpegs(n: int, size: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size * size * 3).reshape(size, size, 3)
    out = []
    for i in range(n):
        img = np.clip(np.roll(base, 5 * i, axis=1) + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=85)
        out.append(inspect("jpeg", buf.getvalue(), 1 << 30))
    return out


def engine(a: argparse.Namespace) -> StreamEngine:
    return StreamEngine.from_spec(model=a.model, device=a.device,
                                  cache={"retrieval": "cluster", "window_tokens": a.window,
                                         "pool": {"capacity_bytes": a.pool_mb << 20}})


async def live(eng: StreamEngine, streams: dict, batch: int, device: str) -> float:
    decoded = {sid: decode_all(frames) for sid, frames in streams.items()}
    start = time.perf_counter()

    async def feed(sid: str):
        frames = decoded[sid]
        for i in range(0, len(frames), batch):
            await eng.ingest_frames(sid, frames[i:i + batch], [float(t) for t in range(i, min(i + batch, len(frames)))])

    await asyncio.gather(*(feed(s) for s in streams))
    sync(device)
    return time.perf_counter() - start


async def rebuild(eng: StreamEngine, log: DiskFrameLog, sids: list[str], batch: int, device: str) -> float:
    async def decode(frames):
        return await asyncio.to_thread(decode_all, frames)

    async def one(sid: str):
        eng.open_stream(sid)
        records = await asyncio.to_thread(lambda: list(log.read(sid)))

        async def text(x, ts):
            eng.append_text(sid, x, ts)

        return await replay(records, lambda f, t: eng.ingest_frames(sid, f, t), text, decode, batch)

    start = time.perf_counter()
    await asyncio.gather(*(one(s) for s in sids))
    sync(device)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--frames", type=int, default=120, help="frames per stream")
    p.add_argument("--batch", type=int, default=8, help="frames of one stream per live append")
    p.add_argument("--replay-batch", type=int, default=64, help="frames of one stream per replayed call "
                   "(DurabilitySpec.replay_batch_frames)")
    p.add_argument("--size", type=int, default=336)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--pool-mb", type=int, default=16384)
    p.add_argument("--quick", action="store_true", help="tiny model, 4 streams x 24 frames")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.quick:
        a.model, a.streams, a.frames, a.size, a.pool_mb = "tiny", 4, 24, 64, 256
    frames = {f"s{i}": jpegs(a.frames, a.size, i) for i in range(a.streams)}
    root = tempfile.mkdtemp(prefix="replay-")
    log = DiskFrameLog(root, "never")
    for sid, fr in frames.items():
        log.append(sid, [OpenRecord(0.0)])
        for i in range(0, a.frames, a.batch):
            chunk = fr[i:i + a.batch]
            log.append(sid, [FrameRecord(i // a.batch, tuple(chunk), tuple(float(t) for t in range(i, i + len(chunk))))])
    log.sync()
    t0 = time.perf_counter()
    warm = engine(a)  # model build + a warm-up stream, not timed
    build_s = time.perf_counter() - t0
    warm.open_stream("warm")
    asyncio.run(live(warm, {"warm": frames["s0"][: 2 * a.batch]}, a.batch, a.device))
    warm.close_stream("warm")

    ref = warm
    for sid in frames:
        ref.open_stream(sid)
    live_s = asyncio.run(live(ref, frames, a.batch, a.device))
    want = {sid: ref.stream_info(sid) for sid in frames}
    for sid in frames:
        ref.close_stream(sid)
    many_s = asyncio.run(rebuild(ref, log, list(frames), a.replay_batch, a.device))
    got = {sid: ref.stream_info(sid) for sid in frames}
    for sid in frames:
        ref.close_stream(sid)
    one_s = asyncio.run(rebuild(ref, log, ["s0"], a.replay_batch, a.device))
    log.close()
    shutil.rmtree(root, ignore_errors=True)
    same = all(got[s]["frames"] == want[s]["frames"] and got[s].get("tokens") == want[s].get("tokens") for s in frames)
    total = a.streams * a.frames
    out = {"model": a.model, "device": a.device, "streams": a.streams, "frames_per_stream": a.frames,
           "jpeg_px": a.size, "batch": a.batch, "replay_batch": a.replay_batch, "engine_build_s": round(build_s, 1),
           "live_ingest_fps": round(total / live_s, 1), "rebuild_all_fps": round(total / many_s, 1),
           "rebuild_all_s": round(many_s, 2), "rebuild_one_fps": round(a.frames / one_s, 1),
           "rebuild_one_s": round(one_s, 2), "rebuilt_equal_live": same}
    report.show_json(a.out, "replay_rate", out)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
