"""Configuration of one Serve application: the runtime behind it and its HTTP ingress.

`AppConfig` is what `build_app` takes: Serve's `args:` in `cluster_configs/serve.yaml`, or the
`app:` section of a `mosaic-ray serve --config` file (`LaunchConfig`, which adds how to reach or
start Ray and where to listen).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mosaic_ray.runtime.config import RuntimeConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngressSpec(_Strict):
    """The FastAPI ingress deployment and its input limits."""

    num_replicas: int = Field(1, ge=1)
    # Requests one replica works on at once; they are mostly awaiting shards, so many is cheap.
    max_ongoing_requests: int = Field(256, ge=1)
    # Requests Serve queues beyond that before answering 503 (-1: unbounded).
    max_queued_requests: int = Field(1024, ge=-1)
    num_cpus: float = Field(0.5, ge=0)
    # 64 MiB: a batch of 64 full-HD JPEGs (~0.5 MB each) with room to spare.
    max_body_bytes: int = Field(64 << 20, ge=1024)
    max_frames_per_batch: int = Field(256, ge=1)
    # Checked from the image header before decoding (a decompression bomb is refused unread).
    max_frame_pixels: int = Field(4096 * 4096, ge=1)
    max_text_chars: int = Field(16_384, ge=1)


class AppConfig(_Strict):
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    ingress: IngressSpec = Field(default_factory=IngressSpec)


class RaySpec(_Strict):
    """How `mosaic-ray serve` reaches Ray: an existing cluster (`address`), or a local one."""

    address: str | None = Field(None, description="'auto' or 'ray://host:10001'; None starts a local cluster")
    num_cpus: int | None = None
    # Logical GPUs of a local cluster: lets N shard actors run on a machine without N GPUs.
    num_gpus: int | None = None
    object_store_memory: int | None = None
    include_dashboard: bool = False
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class HttpSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class LaunchConfig(_Strict):
    """A `mosaic-ray serve --config` file."""

    ray: RaySpec = Field(default_factory=RaySpec)
    http: HttpSpec = Field(default_factory=HttpSpec)
    app_name: str = "mosaic"
    route_prefix: str = "/"
    app: AppConfig = Field(default_factory=AppConfig)
