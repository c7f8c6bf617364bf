"""Arguments shared by the scaling benchmarks (engine, frames, output) and their --quick settings."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Set in the driver of a `ray job submit` job (ray/_private/runtime_env/constants.py).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="engine model (default: 7b-shape on a GPU, tiny on CPU)")
    p.add_argument("--device", default=None, help="engine device (default: cuda if available, else cpu)")
    p.add_argument("--window", type=int, default=2048, help="window tokens kept on the device per stream")
    p.add_argument("--pool-mb", type=int, default=8192, help="host pool per shard (MiB)")
    p.add_argument("--size", type=int, default=336, help="frame side in pixels")
    p.add_argument("--frames-file", default=None,
                   help="frames pre-decoded by `python -m scaling_bench.harness.video_frames` (machines without PyAV)")
    p.add_argument("--max-tokens", type=int, default=16, help="answer tokens per question")
    p.add_argument("--out", default="docs/results",
                   help="results folder (default docs/results, under the current directory; a Ray job needs an "
                        "absolute one); its absolute path is printed at the end")
    p.add_argument("--quick", action="store_true", help="CPU-sized run, under two minutes")
    p.add_argument("--no-progress", action="store_true")


def resolve(a: argparse.Namespace) -> None:
    """Fill model/device and make --out absolute (`out_dir`); --quick shrinks the engine (each
    script shrinks its own load)."""
    a.out = str(out_dir(a.out))
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


def out_dir(out: str | os.PathLike) -> Path:
    """`--out` as an absolute path. A relative one is taken from the current directory, except in
    a Ray job's driver, whose current directory is Ray's temporary copy of `--working-dir`
    (deleted with the job): there it exits at once (status 1, one line) asking for an absolute one."""
    path = Path(out).expanduser()
    if not path.is_absolute() and os.environ.get(RAY_JOB_ENV):
        raise SystemExit(f"error: --out {out} is relative, and this Ray job runs in a temporary copy of its working "
                         f"directory ({Path.cwd()}), deleted with the job: pass an absolute --out DIR (a folder "
                         "on the node that runs the driver)")
    return path.resolve()
