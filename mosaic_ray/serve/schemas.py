"""Typed bodies of the HTTP API (the OpenAI-compatible ones live in `openai_compat.py`).

Everything a client sends is validated here before any stream is touched: a request that fails
validation changes no state and gets a 4xx JSON error (`errors.py`). Request bodies forbid unknown
fields; every string is bounded and `SafeText` (no NUL or other control characters but tab and
newlines, no lone surrogates: they would break a tokenizer or the JSON of a reply, which would be a
5xx); every number has the range the engine can take (a seed beyond 64 bits would make torch raise
inside the engine, breaking the shard).
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from mosaic_ray.runtime.router import STREAM_ID_RE

STREAM_ID_PATTERN = STREAM_ID_RE.pattern

# seq and seed are 64-bit signed integers wherever they are stored (frame logs, torch generators).
MAX_SEQ = 2**63 - 1
# Stream-clock seconds: 30 years. Bounds what the engine turns into positions and logs.
MAX_TIME_S = 1e9
# Ceiling of any text field whatever the config says (`ingress.max_text_chars` is the usual limit).
MAX_TEXT_CHARS = 1 << 20
# A stop string longer than this is no stop string; more than this many is a misuse.
MAX_STOP_CHARS, MAX_STOPS = 256, 16
_ALLOWED_CONTROLS = frozenset("\t\n\r")


def _safe_text(value: str) -> str:
    for ch in value:
        if ch in _ALLOWED_CONTROLS:
            continue
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise ValueError(f"text may not contain the control character U+{ord(ch):04X}")
    return value


SafeText = Annotated[str, AfterValidator(_safe_text)]
StopList = Annotated[list[Annotated[SafeText, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                     Field(max_length=MAX_STOPS)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEQ)]
StreamTime = Annotated[float, Field(ge=0, le=MAX_TIME_S, allow_inf_nan=False)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- streams
class CreateStreamRequest(_In):
    id: str | None = Field(None, pattern=STREAM_ID_PATTERN, description="stream id; generated when absent")
    pruning: bool | None = Field(None, description="the stream's redundant-frame pruning (default: the engine's)")
    prune_threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)

    def stream_options(self) -> dict[str, Any]:
        """Per-stream engine options (`Engine.configure_stream`) this request sets."""
        return {k: v for k, v in (("pruning", self.pruning), ("prune_threshold", self.prune_threshold)) if v is not None}


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

    ts: StreamTime = Field(description="stream-clock seconds")
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
    seq: int | None = Field(None, ge=0, le=MAX_SEQ, description="batch sequence number; a repeated seq is not re-appended")
    frames: list[FrameIn] = Field(min_length=1)


class FrameAck(BaseModel):
    stream_id: str
    seq: int = Field(description="the acknowledged seq")
    frames_added: int
    frames_total: int | None = None
    duplicate: bool = False
    frames_pruned: int | None = Field(None, description="frames of the stream pruned before the encoder so far "
                                                        "(null for engines that do not prune)")


# ---------------------------------------------------------------------- text and questions
class TextIn(_In):
    text: SafeText = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    ts: StreamTime


class TextAck(BaseModel):
    stream_id: str
    ok: bool = True


class QueryIn(_In):
    question: SafeText = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    max_tokens: int = Field(64, ge=1, le=4096)
    stream: bool = Field(False, description="answer as server-sent events")
    since: StreamTime | None = Field(None, description="only context after this stream time")
    until: StreamTime | None = Field(None, description="only context before this stream time")
    temperature: float = Field(0.0, ge=0, le=10, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: StopList = Field(default_factory=list)
    seed: Seed | None = None
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="interactive: TTFT first; batch: after lagging streams' frames")

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
