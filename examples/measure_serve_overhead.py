"""Measure what the serving path costs: HTTP + Serve + Ray over a direct engine call, and ingest
frames/s through Serve with 1 and 2 shards.

    python examples/measure_serve_overhead.py                  # fake engine (tests/runtime)
    python examples/measure_serve_overhead.py --engine tiny    # the real StreamEngine, tiny model

It starts a private Ray cluster (logical GPUs, one per shard) and, for each shard count, a Serve
app; the load generator runs in this process. Frames are 224x224 JPEGs encoded once up front, so
the figures are the server's (HTTP, msgpack, JPEG decode, Ray, engine), not the client's encoding.
Everything shares this machine's cores: on a small machine the client and server compete.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.runtime.fake_engine
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0"}.items():
    os.environ.setdefault(k, v)

MSGPACK = {"content-type": "application/msgpack"}
TINY = {"model": "tiny", "device": "cpu", "cache": {"window_tokens": 256, "pool": {"capacity_bytes": 64 << 20}}}


def engine_spec(kind: str) -> dict:
    if kind == "fake":
        return {"factory": "tests.runtime.fake_engine:FakeEngine", "kwargs": {}}
    return {"kwargs": TINY}


def make_engine(kind: str):
    from mosaic_ray.runtime.config import EngineSpec

    return EngineSpec(**engine_spec(kind)).build()


def jpeg(i: int, size: int) -> bytes:
    rgb = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=85)
    return out.getvalue()


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


# ---------------------------------------------------------------------- direct engine
def direct(kind: str, frames: list[np.ndarray], reps: int, max_tokens: int) -> dict:
    from mosaic_ray.engine.interface import AskRequest

    engine = make_engine(kind)
    engine.open_stream("d")
    append, ask = [], []
    for r in range(reps):
        t = time.perf_counter()
        engine.append_frames("d", frames, [float(r * len(frames) + i) for i in range(len(frames))])
        append.append(time.perf_counter() - t)

    async def one() -> None:
        async for _ in engine.ask("d", AskRequest("What is happening?", max_tokens=max_tokens)):
            pass

    for _ in range(reps):
        t = time.perf_counter()
        asyncio.run(one())
        ask.append(time.perf_counter() - t)
    return {"append_ms": 1e3 * statistics.median(append), "ask_ms": 1e3 * statistics.median(ask)}


# ---------------------------------------------------------------------- through HTTP
async def http_latency(url: str, jpegs: list[bytes], reps: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        sid = (await c.post("/v1/streams", json={"id": "lat"})).json()["id"]
        append, ask = [], []
        for r in range(reps):
            frames = [{"ts": float(r * len(jpegs) + i), "jpeg": j} for i, j in enumerate(jpegs)]
            body = msgpack.packb({"seq": r, "frames": frames}, use_bin_type=True)
            t = time.perf_counter()
            resp = await c.post(f"/v1/streams/{sid}/frames", content=body, headers=MSGPACK)
            append.append(time.perf_counter() - t)
            resp.raise_for_status()
        for _ in range(reps):
            t = time.perf_counter()
            question = {"question": "What is happening?", "max_tokens": max_tokens}
            resp = await c.post(f"/v1/streams/{sid}/query", json=question)
            ask.append(time.perf_counter() - t)
            resp.raise_for_status()
        await c.delete(f"/v1/streams/{sid}")
    return {"append_ms": 1e3 * statistics.median(append), "ask_ms": 1e3 * statistics.median(ask),
            "append_p90_ms": 1e3 * pct(append, 0.9), "ask_p90_ms": 1e3 * pct(ask, 0.9)}


async def ingest_rate(url: str, jpegs: list[bytes], streams: int, batch: int, seconds: float) -> dict:
    """`streams` clients push batches back to back for `seconds`; frames acknowledged per second."""
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        ids = [(await c.post("/v1/streams", json={"id": f"ing{i}"})).json()["id"] for i in range(streams)]
        deadline = time.perf_counter() + seconds
        busy = 0

        async def push(sid: str) -> int:
            nonlocal busy
            seq, sent = 0, 0
            while time.perf_counter() < deadline:
                n0 = seq * batch
                frames = [{"ts": float(n0 + i), "jpeg": jpegs[(n0 + i) % len(jpegs)]} for i in range(batch)]
                body = msgpack.packb({"seq": seq, "frames": frames}, use_bin_type=True)
                resp = await c.post(f"/v1/streams/{sid}/frames", content=body, headers=MSGPACK)
                if resp.status_code == 503:
                    busy += 1
                    await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
                    continue
                resp.raise_for_status()
                seq, sent = seq + 1, sent + resp.json()["frames_added"]
            return sent

        start = time.perf_counter()
        sent = await asyncio.gather(*(push(sid) for sid in ids))
        elapsed = time.perf_counter() - start
        for sid in ids:
            await c.delete(f"/v1/streams/{sid}")
    return {"frames_per_s": sum(sent) / elapsed, "frames": sum(sent), "seconds": elapsed, "busy_503": busy}


def serve_app(num_shards: int, kind: str, replicas: int):
    from ray import serve

    from mosaic_ray.serve.app import build_app

    cfg = {
        "runtime": {"name": f"bench{num_shards}", "num_shards": num_shards, "engine": engine_spec(kind),
                    "shard": {"num_gpus": 1, "num_cpus": 0}, "router": {"health_interval_s": 0}},
        "ingress": {"num_cpus": 0, "num_replicas": replicas},
    }
    serve.run(build_app(cfg), name=f"bench{num_shards}", route_prefix="/")
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["fake", "tiny"], default="fake")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8, help="frames per request")
    p.add_argument("--streams", type=int, default=8, help="concurrent ingesting streams")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    p.add_argument("--replicas-per-shard", type=int, default=1, help="ingress replicas per shard")
    p.add_argument("--port", type=int, default=18500)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()

    import ray
    from ray import serve

    from mosaic_ray.runtime.bootstrap import shutdown_runtime
    from mosaic_ray.runtime.config import RuntimeConfig
    from mosaic_ray.runtime.durability.frame_codec import decode, inspect

    jpegs = [jpeg(i, args.size) for i in range(args.batch)]
    frames = [decode(inspect("jpeg", j, 1 << 26)) for j in jpegs]
    results: dict = {"engine": args.engine, "cpus": os.cpu_count(), "frame": f"{args.size}x{args.size} JPEG",
                     "batch_frames": args.batch, "streams": args.streams,
                     "ingress_replicas_per_shard": args.replicas_per_shard,
                     "direct": direct(args.engine, frames, args.reps, args.max_tokens)}
    t = time.perf_counter()
    for _ in range(args.reps):
        for j in jpegs:
            decode(inspect("jpeg", j, 1 << 26))
    results["jpeg_decode_ms_per_frame"] = 1e3 * (time.perf_counter() - t) / (args.reps * len(jpegs))

    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), num_gpus=max(args.shards), include_dashboard=False,
             object_store_memory=300 << 20, log_to_driver=False, _temp_dir=tmp)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    for n in args.shards:
        cfg = serve_app(n, args.engine, n * args.replicas_per_shard)
        entry = {"ingest": asyncio.run(ingest_rate(url, jpegs, args.streams, args.batch, args.seconds))}
        if n == args.shards[0]:
            entry["http"] = asyncio.run(http_latency(url, jpegs, args.reps, args.max_tokens))
        results[f"shards_{n}"] = entry
        serve.delete(f"bench{n}")
        shutdown_runtime(RuntimeConfig(**cfg["runtime"]), forget_streams=True)
    serve.shutdown()
    ray.shutdown()

    d, h = results["direct"], results[f"shards_{args.shards[0]}"]["http"]
    results["ratio_http_over_direct"] = {"append": h["append_ms"] / d["append_ms"], "ask": h["ask_ms"] / d["ask_ms"]}
    results["added_ms"] = {"append": h["append_ms"] - d["append_ms"], "ask": h["ask_ms"] - d["ask_ms"]}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
