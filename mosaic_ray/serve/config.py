"""Configuration of one Serve application: the runtime behind it and its HTTP ingress.

`AppConfig` is what `build_app` takes: Serve's `args:` in `cluster_configs/serve.yaml`, or the
`app:` section of a `mosaic-ray serve --config` file (`LaunchConfig`, which adds how to reach or
start Ray and where to listen).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from mosaic_ray.bounds import MAX_TEXT_CHARS
from mosaic_ray.config_model import ConfigModel
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.serve.realtime_config import RealtimeSpec


class IngressSpec(ConfigModel):
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
    max_text_chars: int = Field(16_384, ge=1, le=MAX_TEXT_CHARS)
    # A question's length, checked before any tokenizer sees it (HTTP, chat and WebSocket alike):
    # a character bound standing for the engine's token bound. 16 384 is 8 characters per token of
    # the engine's default 2048-token question budget (`EngineConfig.max_question_tokens`), twice
    # English's ~4, so a question the engine would take is not refused here; the engine refuses a
    # question over its tokens (422) after tokenizing at most this much (~ms), where the 7M-character
    # question of issue 20 held an engine for 10.8 s.
    max_question_chars: int = Field(16_384, ge=1, le=MAX_TEXT_CHARS)
    # A request body must send a chunk at least every `body_idle_timeout_s` and be complete within
    # `body_timeout_s` of its headers, or it is refused with 408 (`body_limit.py`). 120 s moves the
    # largest body (64 MiB) at ~0.5 MB/s, a slow uplink; 30 s without a byte is no stall of a live
    # link (TCP retransmits within a few seconds) but a client that stopped sending.
    body_idle_timeout_s: float = Field(30.0, gt=0)
    body_timeout_s: float = Field(120.0, gt=0)
    # The WebSocket endpoint /v1/realtime: message size, queue, heartbeat, idle timeout.
    realtime: RealtimeSpec = Field(default_factory=RealtimeSpec)


# A tenant name prefixes its streams' ids inside the runtime (`tenant:id`, see `auth.py`): no ':'.
TENANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# Shorter keys can be guessed; 16 characters of a random token are ~95 bits.
MIN_KEY_CHARS = 16


class TenantLimits(ConfigModel):
    """What one tenant may use. None: no limit. Rates are token buckets (`limits.py`) that hold
    `burst_s` seconds of the rate: a client may send that much at once after an idle spell."""

    max_streams: int | None = Field(None, ge=0, description="streams the tenant may hold at once")
    frames_per_s: float | None = Field(None, gt=0, description="frames pushed per second")
    bytes_per_s: float | None = Field(None, gt=0, description="request body bytes (frames, text) per second")
    question_tokens_per_s: float | None = Field(
        None, gt=0, description="question tokens per second, on every path (query, chat, WebSocket): a question "
        "costs its estimated prompt tokens (characters / 4) plus its max_tokens, so one tenant cannot hold a "
        "shard's engine with questions")
    # 2 s: a client sending one batch per second may miss a beat without being refused.
    burst_s: float = Field(2.0, gt=0)
    # Retry-After of a 429 for too many streams: nothing frees one but a delete, so a long pause.
    streams_retry_after_s: float = Field(30.0, gt=0)


class AuthSpec(ConfigModel):
    """API keys, one tenant each, and an admin key. No key configured (here or in the environment):
    auth is off and the API is open, as before issue 9."""

    # A bad key must not be echoed into logs by the validation error.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant name")
    admin_key: str | None = Field(None, description="the key of cluster operations (metrics, every stream)")
    # Read when a replica starts, and added to `keys` / used when `admin_key` is None:
    # MOSAIC_API_KEYS="key1:tenantA,key2:tenantB" (the last ':' of each item separates the tenant).
    keys_env: str = "MOSAIC_API_KEYS"
    admin_key_env: str = "MOSAIC_ADMIN_KEY"
    limits: TenantLimits = Field(default_factory=TenantLimits, description="limits of every tenant")
    tenants: dict[str, TenantLimits] = Field(default_factory=dict, description="per-tenant overrides")

    @field_validator("keys")
    @classmethod
    def _check_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key, tenant in value.items():
            check_key(key)
            check_tenant(tenant)
        return value

    @field_validator("admin_key")
    @classmethod
    def _check_admin(cls, value: str | None) -> str | None:
        return None if value is None else check_key(value)

    @model_validator(mode="after")
    def _admin_is_no_tenant(self) -> AuthSpec:
        if self.admin_key is not None and self.admin_key in self.keys:
            raise ValueError("the admin key must differ from every tenant key")
        for tenant in self.tenants:
            check_tenant(tenant)
        return self

    def limits_of(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.limits)


def check_key(key: str) -> str:
    if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or any(c in key for c in " ,"):
        raise ValueError(f"an API key is at least {MIN_KEY_CHARS} printable ASCII characters without ' ' or ','")
    return key


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.match(tenant):
        raise ValueError(f"tenant names match {TENANT_RE.pattern}, got {tenant!r}")
    return tenant


class AppConfig(ConfigModel):
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)


class RaySpec(ConfigModel):
    """How `mosaic-ray serve` reaches Ray: an existing cluster (`address`), or a local one."""

    address: str | None = Field(None, description="'auto' or 'ray://host:10001'; None starts a local cluster")
    num_cpus: int | None = None
    # Logical GPUs of a local cluster: lets N shard actors run on a machine without N GPUs.
    num_gpus: int | None = None
    object_store_memory: int | None = None
    include_dashboard: bool = False
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class HttpSpec(ConfigModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # A request's headers must arrive within this many seconds of their first byte, else 408
    # (`header_guard.py`: `mosaic-ray serve` listens at host:port and hands connections to Serve's
    # proxy on a loopback port; uvicorn has no such timeout). 10 s: a phone on a poor uplink sends
    # a few hundred header bytes in well under 1 s. 0: no guard (Serve's proxy at host:port).
    # Only for a private cluster: a joined one's proxy is the cluster's (front it with a proxy).
    header_timeout_s: float = Field(10.0, ge=0, le=3600)
    # A connection with no request for this long is closed (uvicorn's keep-alive does so after a
    # response; this covers a connection that never sent one).
    idle_timeout_s: float = Field(90.0, gt=0, le=86400)
    # A request head (request line + headers) larger than this is refused with 431.
    max_header_bytes: int = Field(64 << 10, ge=1024, le=16 << 20)


class LaunchConfig(ConfigModel):
    """A `mosaic-ray serve --config` file."""

    ray: RaySpec = Field(default_factory=RaySpec)
    http: HttpSpec = Field(default_factory=HttpSpec)
    app_name: str = "mosaic"
    route_prefix: str = "/"
    app: AppConfig = Field(default_factory=AppConfig)
    # On SIGTERM / Ctrl-C, requests already admitted get this long to finish (new ones get 503)
    # before the logs are fsynced and Serve stops. 20 s: a long answer (TTFT under 1 s
    # at 1 h of video, then decoding) finishes within it, and Kubernetes' default 30 s grace
    # leaves room for the fsync and Serve's own shutdown after it.
    drain_timeout_s: float = Field(20.0, ge=0)
