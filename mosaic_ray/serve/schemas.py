"""Typed bodies of the HTTP API (the OpenAI-compatible ones live in `openai_compat.py`).

Everything a client sends is validated here before any stream is touched: a request that fails
validation changes no state and gets a 4xx JSON error (`errors.py`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mosaic_ray.runtime.router import STREAM_ID_RE

STREAM_ID_PATTERN = STREAM_ID_RE.pattern


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- streams
class CreateStreamRequest(_In):
    id: str | None = Field(None, pattern=STREAM_ID_PATTERN, description="stream id; generated when absent")


class StreamRef(BaseModel):
    id: str
    shard: str


class StreamList(BaseModel):
    streams: list[StreamRef]


class StreamInfo(BaseModel):
    """The engine's `stream_info` plus where the stream lives and its last acknowledged seq."""

    model_config = ConfigDict(extra="allow")
    id: str
    shard: str
    last_seq: int = Field(description="highest acknowledged frame-batch seq (-1: none yet)")
    frames: int | None = None
    ingest_fps: float = 0.0


class Deleted(BaseModel):
    id: str
    deleted: bool = True


# ---------------------------------------------------------------------- frames
class FrameIn(_In):
    """One frame of a msgpack batch: exactly one of jpeg / png / raw (raw needs shape [H, W, 3])."""

    ts: float = Field(ge=0, allow_inf_nan=False, description="stream-clock seconds")
    jpeg: bytes | None = None
    png: bytes | None = None
    raw: bytes | None = None
    shape: list[int] | None = Field(None, min_length=3, max_length=3)

    @model_validator(mode="after")
    def _one_payload(self) -> FrameIn:
        given = [k for k in ("jpeg", "png", "raw") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a frame needs exactly one of jpeg, png, raw; got {given or 'none'}")
        if (self.raw is None) != (self.shape is None):
            raise ValueError("shape [H, W, 3] goes with raw, and only with raw")
        return self


class FrameBatchIn(_In):
    seq: int | None = Field(None, ge=0, description="batch sequence number; a repeated seq is not re-appended")
    frames: list[FrameIn] = Field(min_length=1)


class FrameAck(BaseModel):
    stream_id: str
    seq: int = Field(description="the acknowledged seq")
    frames_added: int
    frames_total: int | None = None
    duplicate: bool = False


# ---------------------------------------------------------------------- text and questions
class TextIn(_In):
    text: str = Field(min_length=1)
    ts: float = Field(ge=0, allow_inf_nan=False)


class TextAck(BaseModel):
    stream_id: str
    ok: bool = True


class QueryIn(_In):
    question: str = Field(min_length=1)
    max_tokens: int = Field(64, ge=1, le=4096)
    stream: bool = Field(False, description="answer as server-sent events")
    since: float | None = Field(None, allow_inf_nan=False, description="only context after this stream time")
    until: float | None = Field(None, allow_inf_nan=False, description="only context before this stream time")
    temperature: float = Field(0.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None

    @model_validator(mode="after")
    def _window(self) -> QueryIn:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since must be <= until")
        return self

    def ask_params(self) -> dict[str, Any]:
        """Keyword arguments of the engine's `AskRequest`."""
        return self.model_dump(exclude={"stream"})


class QueryAnswer(BaseModel):
    stream_id: str
    answer: str
    deltas: int = Field(description="text deltas the engine produced (about one per token)")
    ttft_ms: float = Field(description="question reaching its shard -> first delta")
    latency_ms: float = Field(description="request in the ingress -> answer complete")


# ---------------------------------------------------------------------- service
class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    shards: dict[str, str]
