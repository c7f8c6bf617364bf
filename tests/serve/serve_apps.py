"""A second Serve app beside the session's shared one (`serve_url` in tests/conftest.py), on its own
route prefix and runtime, for tests that need other settings (auth, small queues, a slow engine)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np
from PIL import Image

MSGPACK = {"content-type": "application/msgpack"}


@contextmanager
def extra_app(serve_url: str, name: str, config: dict[str, Any]) -> Iterator[str]:
    """Run `config` (an AppConfig dict) as app `name` at `<serve_url>/<name>`; yield that URL."""
    from ray import serve

    from mosaic_ray.runtime.bootstrap import shutdown_runtime
    from mosaic_ray.runtime.config import RuntimeConfig
    from mosaic_ray.serve.app import build_app

    runtime = RuntimeConfig(**config["runtime"])
    shutdown_runtime(runtime, forget_streams=True)
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    try:
        yield f"{serve_url}/{name}"
    finally:
        serve.delete(name)
        shutdown_runtime(runtime, forget_streams=True)


def png(value: int = 120, size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def frames_body(seq: int | None, n: int = 1, ts0: float = 0.0) -> bytes:
    """A msgpack batch of `n` small PNG frames at ts0, ts0 + 0.1, ..."""
    batch: dict[str, Any] = {"frames": [{"ts": ts0 + 0.1 * i, "png": png()} for i in range(n)]}
    if seq is not None:
        batch["seq"] = seq
    return msgpack.packb(batch, use_bin_type=True)
