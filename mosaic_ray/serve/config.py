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
    """The HTTP ingress deployment (FastAPI on Serve) and its input limits (docs/api.md,
    "Authentication and limits").

    Fixed bounds, in code because they describe the protocol rather than tune it: msgpack strings 64
    characters (they are field names), maps 8 entries, nesting 4 deep, 2 + 2 x `max_frames_per_batch`
    maps and arrays, no extension types (`serve/frames.py`); text fields at most 2^20 characters, 16
    stop strings of 256, seq and seed 0 to 2^63 - 1, times 0 to 1e9 s, temperature below 1e-4 greedy,
    top_p at least 1e-6, the stream-id grammar (`mosaic_ray/bounds.py`, the types in `serve/schemas.py`).
    """

    num_replicas: int = Field(1, ge=1, description=(
        "ingress replicas; per-tenant rates are split evenly between them"))
    max_ongoing_requests: int = Field(256, ge=1, description=(
        "Serve's bound of the requests one replica works on at once (they mostly await shards, so many is "
        "cheap)"))
    max_queued_requests: int = Field(1024, ge=-1, description=(
        "requests Serve queues for one replica beyond `max_ongoing_requests`; beyond, Serve answers 503 "
        "(-1: unbounded)"))
    num_cpus: float = Field(0.5, ge=0, description="CPUs of one ingress replica (Ray resources)")
    max_body_bytes: int = Field(64 << 20, ge=1024, description=(
        "any route's body (413, `serve/body_limit.py`): 64 MiB is a batch of 64 full-HD JPEGs (~0.5 MB each) "
        "with room to spare; also the longest msgpack byte string"))
    max_frames_per_batch: int = Field(256, ge=1, description=(
        "frames in one batch; also the longest msgpack array. At most the engine's `max_frames_per_call` "
        "(the shard hands a batch to the engine whole)"))
    max_frame_pixels: int = Field(4096 * 4096, ge=1, description=(
        "pixels of one frame, read from the image header before decoding (a decompression bomb is refused "
        "unread)"))
    max_text_chars: int = Field(16_384, ge=1, le=MAX_TEXT_CHARS, description="the longest text append (characters)")
    # The engine refuses a question over its tokens (422) after tokenizing at most this much (~ms),
    # where the 7M-character question of issue 20 held an engine for 10.8 s.
    max_question_chars: int = Field(16_384, ge=1, le=MAX_TEXT_CHARS, description=(
        "the longest question (characters), on every path (HTTP, chat, WebSocket), checked before any "
        "tokenizer (413 `question_too_long`): 8 characters per token of the engine's default 2048-token "
        "question budget (`max_question_tokens`), twice English's ~4, so a question the engine would take is "
        "not refused here"))
    body_idle_timeout_s: float = Field(30.0, gt=0, description=(
        "longest wait (seconds) for the next chunk of a request body (408 `request_timeout`, "
        "`serve/body_limit.py`): 30 s without a byte is no stall of a live link (TCP retransmits within "
        "seconds) but a client that stopped sending"))
    body_timeout_s: float = Field(120.0, gt=0, description=(
        "a whole request body must arrive within this many seconds of its headers (408): 120 s moves the "
        "largest body (64 MiB) at ~0.5 MB/s, a slow uplink"))
    realtime: RealtimeSpec = Field(default_factory=RealtimeSpec, description=(
        "the WebSocket endpoint `/v1/realtime`: message size, queue, heartbeat, idle timeout (`RealtimeSpec`)"))


# A tenant name prefixes its streams' ids inside the runtime (`tenant:id`, see `auth.py`): no ':'.
TENANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# Shorter keys can be guessed; 16 characters of a random token are ~95 bits.
MIN_KEY_CHARS = 16


class TenantLimits(ConfigModel):
    """What one tenant may use (`limits`, and each of `tenants`, of `AuthSpec`). None: no limit.
    Rates are token buckets (`serve/limits.py`) that hold `burst_s` seconds of the rate: a client may
    send that much at once after an idle spell."""

    max_streams: int | None = Field(None, ge=0, description=(
        "streams the tenant may hold at once; the router counts them (429 `quota_exceeded`)"))
    frames_per_s: float | None = Field(None, gt=0, description=(
        "frames pushed per second, token bucket (429 `rate_limited`)"))
    bytes_per_s: float | None = Field(None, gt=0, description=(
        "frame and text request body bytes per second, token bucket (429 `rate_limited`)"))
    question_tokens_per_s: float | None = Field(
        None, gt=0, description="question tokens per second, on every path (query, chat, WebSocket): a question "
        "costs its estimated prompt tokens (ceil(characters / 4)) plus its `max_tokens`, token bucket (429 "
        "`rate_limited`), so one tenant cannot hold a shard's engine with questions")
    burst_s: float = Field(2.0, gt=0, description=(
        "a bucket holds this many seconds of its rate: 2 s lets a client sending one batch a second miss a "
        "beat without being refused"))
    streams_retry_after_s: float = Field(30.0, gt=0, description=(
        "Retry-After (seconds) of a 429 `quota_exceeded`: nothing frees a stream slot but a delete, so a long "
        "pause"))


class AuthSpec(ConfigModel):
    """API keys, one tenant each, and an admin key (`serve/auth.py`).

    No key configured, here or in the environment: auth is off and the API is open (the default).

    The replicas must see the variables: a local cluster (`mosaic-ray serve` without `ray.address`)
    inherits the environment of the command (checked); on a running cluster, set them where `ray start`
    runs on each node, or in `ray.runtime_env.env_vars` (visible to whoever reads the job's config).
    """

    # A bad key must not be echoed into logs by the validation error.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    keys: dict[str, str] = Field(default_factory=dict, description=(
        "API key -> tenant name (`^[A-Za-z0-9_-]{1,32}$`). Keys are >= 16 printable ASCII characters without "
        "spaces or commas. Prefer the environment (`keys_env`): a key in the config travels in Serve's "
        "deployment arguments"))
    admin_key: str | None = Field(None, description=(
        "the key of cluster operations: every stream, `/metrics`, `/health` details; None: `admin_key_env`"))
    # The last ':' of each item separates the tenant.
    keys_env: str = Field("MOSAIC_API_KEYS", description=(
        "environment variable read by each ingress replica at start: `key1:tenantA,key2:tenantB`, added to "
        "`keys`"))
    admin_key_env: str = Field("MOSAIC_ADMIN_KEY", description=(
        "environment variable of the admin key, read when `admin_key` is None"))
    limits: TenantLimits = Field(default_factory=TenantLimits, description=(
        "limits of every tenant (`TenantLimits`; by default none)"))
    tenants: dict[str, TenantLimits] = Field(default_factory=dict, description=(
        "tenant -> its own `TenantLimits` (replaces `limits` for it)"))

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
    """One Serve application (`app` of a `mosaic-ray serve` config; Serve's `args:`): the runtime behind
    it, its HTTP ingress and its API keys."""

    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description=(
        "the router, shards and their engines (`RuntimeConfig`)"))
    ingress: IngressSpec = Field(default_factory=IngressSpec, description=(
        "the HTTP ingress deployment and its input limits (`IngressSpec`)"))
    auth: AuthSpec = Field(default_factory=AuthSpec, description="API keys, tenants and their limits (`AuthSpec`)")

    @model_validator(mode="after")
    def _a_batch_fits_one_engine_call(self) -> AppConfig:
        """A frame batch the ingress takes reaches the engine as one append (the shard coalesces
        whole batches), so it must fit `max_frames_per_call` (real engine only)."""
        engine = self.runtime.engine.engine_config
        if engine is not None and self.ingress.max_frames_per_batch > engine.max_frames_per_call:
            raise ValueError(f"ingress.max_frames_per_batch ({self.ingress.max_frames_per_batch}) must be at most "
                             f"runtime.engine.kwargs.max_frames_per_call ({engine.max_frames_per_call})")
        return self


class RaySpec(ConfigModel):
    """How `mosaic-ray serve` reaches Ray: an existing cluster (`address`), or a local one it
    starts (the other fields are that cluster's `ray.init` arguments)."""

    address: str | None = Field(None, description="'auto' or 'ray://host:10001'; None starts a local cluster")
    num_cpus: int | None = Field(None, description="CPUs of a local cluster; None: Ray detects them")
    num_gpus: int | None = Field(None, description=(
        "GPUs of a local cluster, logical: lets N shard actors run on a machine without N GPUs; None: Ray "
        "detects them"))
    object_store_memory: int | None = Field(None, description=(
        "object store size of a local cluster (bytes); None: Ray's default"))
    include_dashboard: bool = Field(False, description="start Ray's dashboard with a local cluster")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description=(
        "Ray runtime environment of the job (e.g. `env_vars`, visible to whoever reads the job's config)"))


class HttpSpec(ConfigModel):
    """Where `mosaic-ray serve` listens (`serve/header_guard.py`) and its guards on a connection
    before a request reaches Serve."""

    host: str = Field("127.0.0.1", description=(
        "address the service listens on (with a private cluster: the header guard, in front of Serve's proxy "
        "on a loopback port)"))
    port: int = Field(8000, ge=1, le=65535, description="port the service listens on")
    # `header_guard.py`: `mosaic-ray serve` listens at host:port and hands connections to Serve's
    # proxy on a loopback port; uvicorn has no such timeout.
    header_timeout_s: float = Field(10.0, ge=0, le=3600, description=(
        "a request's headers must be complete this many seconds after their first byte, else 408 "
        "`request_timeout`: a phone on a poor uplink sends a few hundred header bytes in well under 1 s. 0: no "
        "guard (Serve's proxy listens at host:port). A joined cluster has none (its proxy is the cluster's; "
        "front it with a proxy)"))
    idle_timeout_s: float = Field(90.0, gt=0, le=86400, description=(
        "a connection with no request for this long (seconds) is closed (uvicorn's keep-alive does so after a "
        "response; this covers one that never sent a request)"))
    max_header_bytes: int = Field(64 << 10, ge=1024, le=16 << 20, description=(
        "a larger request head (request line + headers) is 431 `headers_too_large`"))


class LaunchConfig(ConfigModel):
    """A `mosaic-ray serve --config` file: how to reach or start Ray, where to listen, and the application."""

    ray: RaySpec = Field(default_factory=RaySpec, description="how to reach or start Ray (`RaySpec`)")
    http: HttpSpec = Field(default_factory=HttpSpec, description=(
        "where to listen, and the connection guards (`HttpSpec`)"))
    app_name: str = Field("mosaic", description="name of the Serve application")
    route_prefix: str = Field("/", description="HTTP path prefix the application is served under")
    app: AppConfig = Field(default_factory=AppConfig, description="the Serve application (`AppConfig`)")
    # 20 s: a long answer (TTFT under 1 s at 1 h of video, then decoding) finishes within it, and
    # Kubernetes' default 30 s grace leaves room for the fsync and Serve's own shutdown after it.
    drain_timeout_s: float = Field(20.0, ge=0, description=(
        "on SIGTERM / Ctrl-C, how long (seconds) requests already admitted get to finish (new ones get 503 "
        "`shutting_down`) before the logs are fsynced and Serve stops: a long answer finishes within 20 s, and "
        "Kubernetes' default 30 s grace leaves room after it"))
