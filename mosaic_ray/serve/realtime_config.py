"""Limits and timers of the realtime WebSocket endpoint (`realtime.py`): `ingress.realtime` in a config."""

from __future__ import annotations

from pydantic import Field, model_validator

from mosaic_ray.config_model import ConfigModel


class RealtimeSpec(ConfigModel):
    """The WebSocket endpoint `/v1/realtime` (`serve/realtime.py`, docs/realtime.md): one session's
    limits and timers. Frame and text limits (frames per batch, pixels per frame, text and question
    characters) are the ingress's HTTP ones."""

    # 8 MiB: a full-HD JPEG (~0.5 MB) as base64 (x4/3) with room to spare, or a msgpack batch of a
    # dozen. Uvicorn itself closes a connection whose message exceeds its `ws_max_size`.
    max_message_bytes: int = Field(8 << 20, ge=1024, le=16 << 20, description=(
        "a larger message gets an `error` event and is dropped; the session stays open. A full-HD JPEG as "
        "base64 is ~0.7 MB. Keep it below uvicorn's `ws_max_size` (16 MiB), which closes the connection"))
    max_queued_events: int = Field(64, ge=1, le=65536, description=(
        "events (appends, text, questions) waiting for the session's ordered worker; beyond, the socket is "
        "not read until one is done (TCP backpressure on the client)"))
    heartbeat_s: float = Field(15.0, gt=0, description=(
        "a `heartbeat` event is sent this often (seconds), so that idle clients and proxies see life; below "
        "`idle_timeout_s`"))
    idle_timeout_s: float = Field(300.0, gt=0, description=(
        "a session that receives nothing this long (seconds) is closed (code 1001); its stream stays"))

    @model_validator(mode="after")
    def _heartbeat_before_idle(self) -> RealtimeSpec:
        if self.heartbeat_s >= self.idle_timeout_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be below idle_timeout_s ({self.idle_timeout_s})")
        return self
