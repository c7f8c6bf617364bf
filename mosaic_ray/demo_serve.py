"""`mosaic-ray demo --serve`: the demo of `demo.py`, through the HTTP API.

Starts a private Ray cluster in this process (or uses the one this process already initialized,
as the tests do), runs the Serve app with one shard whose StreamEngine is built from the demo's
options, then plays the video with the Python client over HTTP: JPEG frames in batches, the
captions at their timestamps, the questions with answers printed as their deltas arrive. The app,
and Serve and Ray when started here, are shut down at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import time

from tqdm import tqdm

from mosaic_ray.demo_script import demo_script

APP_NAME = "mosaic-demo"
RUNTIME_NAME = "demo"  # actors demo:router, demo:shard:0
STREAM_ID = "demo"

# A quiet, fast private cluster (no token auth, usage stats or metrics).
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_prestart_worker_first_driver": "0",
}


def app_config(engine_spec: dict, shard_gpus: float) -> dict:
    """An AppConfig: one shard running the demo's engine, one small ingress replica."""
    return {
        "runtime": {
            "name": RUNTIME_NAME, "num_shards": 1,
            "engine": {"factory": "mosaic_ray.engine.stream_engine:StreamEngine.from_spec", "kwargs": engine_spec},
            "shard": {"num_gpus": shard_gpus, "num_cpus": 0.5, "start_timeout_s": 900},
        },
        "ingress": {"num_replicas": 1, "num_cpus": 0.25},
    }


def run(args: argparse.Namespace, video: str, info: dict, engine_spec: dict) -> int:
    import ray
    from ray import serve

    from mosaic_ray.serve.app import build_app

    owns_ray = not ray.is_initialized()
    t0 = time.perf_counter()
    if owns_ray:
        _start_ray()
    cfg = app_config(engine_spec, 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0)
    running = _running_serve_port()
    try:
        url = _deploy(serve, build_app(cfg), running or _usable_port(args.port), start_serve=running is None)
        print(f"Ray + Serve up and the engine loaded in its shard in {time.perf_counter() - t0:.1f} s; "
              f"serving at {url}", flush=True)
        return _play(url, args, video, info)
    finally:
        _shut_down(cfg, owns_serve=running is None, owns_ray=owns_ray)


def _shut_down(cfg: dict, owns_serve: bool, owns_ray: bool) -> None:
    import ray
    from ray import serve

    from mosaic_ray.runtime.bootstrap import shutdown_runtime
    from mosaic_ray.runtime.config import RuntimeConfig

    try:
        if not owns_ray:  # a cluster that outlives the demo: remove what the demo put there
            with contextlib.suppress(Exception):  # not deployed (the start failed)
                serve.delete(APP_NAME)
            shutdown_runtime(RuntimeConfig(**cfg["runtime"]), forget_streams=True)
        if owns_serve and not owns_ray:
            with contextlib.suppress(Exception):
                serve.shutdown()
    finally:
        if owns_ray:
            ray.shutdown()  # the private cluster goes, with Serve and the runtime's detached actors
    print("Serve" + (" and Ray" if owns_ray else "") + " shut down", flush=True)


def _start_ray() -> None:
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    # Ray pins an actor's OMP_NUM_THREADS to its CPU share (1 for the shard's 0.5) unless the
    # environment sets it: the shard's torch gets every core, as the local demo's does.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    gpus = None if _cuda_available() else 1  # a logical GPU on a CPU machine, as local.yaml does
    ray.init(address="local", num_cpus=2, num_gpus=gpus, include_dashboard=False,
             object_store_memory=256 << 20, log_to_driver=False, logging_level=logging.WARNING)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _running_serve_port() -> int | None:
    """The HTTP port of a Serve instance already running on this cluster, or None."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config.port


def _deploy(serve, app, port: int, start_serve: bool) -> str:
    """Run the app; returns its base URL. A Serve instance already running keeps its port and its
    own "/" app: the demo's app goes under a route prefix of its own there."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if start_serve:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    prefix = "/" if start_serve else f"/{APP_NAME}"
    serve.run(app, name=APP_NAME, route_prefix=prefix)
    return f"http://127.0.0.1:{port}{prefix.rstrip('/')}"


def _usable_port(port: int) -> int:
    """`port` if nothing listens there (0: any free port); exits with a message otherwise."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(f"mosaic-ray demo --serve: port {port} is in use; pass --port N (0: any free port)")
        return s.getsockname()[1]


def _play(url: str, args: argparse.Namespace, video: str, info: dict) -> int:
    """The local demo's sequence, over HTTP: frames and captions in time order, then the questions."""
    if getattr(args, "realtime", False):
        from mosaic_ray import demo_realtime

        return demo_realtime.play(url, args, video, info)
    from mosaic_ray.client import MosaicClient
    from mosaic_ray.video import read_frames

    frames = list(read_frames(video, fps=args.fps, max_frames=args.max_frames))
    captions, questions = demo_script(args, video, info["duration_s"])
    with MosaicClient(url, timeout_s=600) as client:
        sid = client.create_stream(STREAM_ID)
        last_ts, t0 = 0.0, time.perf_counter()
        with tqdm(total=len(frames), unit="frame", desc="ingest (HTTP)") as bar:
            for i in range(0, len(frames), args.batch):
                batch = frames[i : i + args.batch]
                while captions and captions[0][0] <= batch[0].ts:
                    ts, text = captions.pop(0)
                    client.push_text(sid, text, max(ts, last_ts))
                client.push_frames(sid, [f.rgb for f in batch], [f.ts for f in batch])
                last_ts = batch[-1].ts
                bar.update(len(batch))
        for ts, text in captions:
            client.push_text(sid, text, max(ts, last_ts))
        took = time.perf_counter() - t0
        s = client.stream_info(sid)
        print(f"ingested {s['frames']} frames ({s['tokens']} tokens) over HTTP in {took:.1f} s = "
              f"{s['frames'] / took:.1f} frames/s; {s['past_tokens']} tokens offloaded, "
              f"device KV {s['kv_bytes_device'] / 2**20:.1f} MiB, host pool {s['kv_bytes_host'] / 2**20:.1f} MiB",
              flush=True)
        for q in questions:
            print(f"Q: {q}\nA: ", end="", flush=True)
            start, first, text = time.perf_counter(), None, ""
            for delta in client.ask_stream(sid, q, max_tokens=args.max_tokens):
                first = first or time.perf_counter()
                if not text:
                    delta = delta.lstrip()
                text += delta
                print(delta, end="", flush=True)
            end = time.perf_counter()
            ttfd = f"{(first - start) * 1000:.0f} ms" if first else "-"
            print(f"\n   first delta {ttfd}, total {(end - start) * 1000:.0f} ms (HTTP, streamed)", flush=True)
        client.delete_stream(sid)
    return 0
