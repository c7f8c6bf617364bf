"""Limits and timers of the realtime WebSocket endpoint (`realtime.py`): `ingress.realtime` in a config."""

from __future__ import annotations

from pydantic import Field, model_validator

from mosaic_ray.config_model import ConfigModel


class RealtimeSpec(ConfigModel):
    """One WebSocket session's limits. Frame limits (frames per batch, pixels per frame) are the
    ingress's own, shared with HTTP."""

    # 8 MiB: a full-HD JPEG (~0.5 MB) as base64 (x4/3) with room to spare, or a msgpack batch of a
    # dozen. A bigger message gets an `error` event and is dropped; the session stays open. Uvicorn
    # itself closes a connection whose message exceeds its `ws_max_size` (16 MiB by default), so
    # keep this below that.
    max_message_bytes: int = Field(8 << 20, ge=1024, le=16 << 20)
    # Events waiting for the session's ordered worker (appends, text, questions). Beyond, the
    # session stops reading the socket until one is done: TCP pushes back on the client.
    max_queued_events: int = Field(64, ge=1, le=65536)
    # A `heartbeat` event is sent this often (seconds), so that idle clients and proxies see life.
    heartbeat_s: float = Field(15.0, gt=0)
    # A session that receives nothing for this long is closed (code 1001); the stream stays.
    idle_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat_before_idle(self) -> RealtimeSpec:
        if self.heartbeat_s >= self.idle_timeout_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be below idle_timeout_s ({self.idle_timeout_s})")
        return self
