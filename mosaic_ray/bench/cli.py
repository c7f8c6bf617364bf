"""Arguments shared by the scaling benchmarks (engine, frames, output) and their --quick settings."""

from __future__ import annotations

import argparse
import os


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="engine model (default: 7b-shape on a GPU, tiny on CPU)")
    p.add_argument("--device", default=None, help="engine device (default: cuda if available, else cpu)")
    p.add_argument("--window", type=int, default=2048, help="window tokens kept on the device per stream")
    p.add_argument("--pool-mb", type=int, default=8192, help="host pool per shard (MiB)")
    p.add_argument("--size", type=int, default=336, help="frame side in pixels")
    p.add_argument("--frames-file", default=None,
                   help="frames pre-decoded by `python -m mosaic_ray.bench.video_frames` (machines without PyAV)")
    p.add_argument("--max-tokens", type=int, default=16, help="answer tokens per question")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--quick", action="store_true", help="CPU-sized run, under two minutes")
    p.add_argument("--no-progress", action="store_true")


def resolve(a: argparse.Namespace) -> None:
    """Fill model/device; --quick shrinks the engine (each script shrinks its own load)."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if a.quick:
        a.model, a.window, a.pool_mb, a.size, a.max_tokens = a.model or "tiny", 64, 256, 112, 8
    a.device = a.device or ("cuda" if cuda else "cpu")
    a.model = a.model or ("7b-shape" if a.device == "cuda" else "tiny")
    if a.device == "cpu":
        # One engine thread per shard; torch's own pool would oversubscribe a small machine.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
