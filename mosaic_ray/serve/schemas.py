"""Typed bodies of the HTTP API (the OpenAI-compatible ones live in `openai_compat.py`).

Everything a client sends is validated here before any stream is touched: a request that fails
validation changes no state and gets a 4xx JSON error (`errors.py`). Request bodies forbid unknown
fields; every string is bounded and `SafeText` (no NUL or other control characters but tab and
newlines, no lone surrogates: they would break a tokenizer or the JSON of a reply, which would be a
5xx); every number has the range the engine can take (a seed beyond 64 bits would make torch raise
inside the engine, breaking the shard).

The types below (`Seq`, `Seed`, `StreamTime`, `Temperature`, `TopP`, `Question`, `StreamIdStr`,
...) are built from `mosaic_ray.bounds`, and they are the only ones: the WebSocket events
(`realtime_events.py`) and the OpenAI bodies use them too, and every question, whichever path it
came by, reaches its shard through `engine_ask` (bounds re-checked, the question's length bounded
by `ingress.max_question_chars`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from mosaic_ray.bounds import (
    MAX_SEQ,
    MAX_TEMPERATURE,
    MAX_TEXT_CHARS,
    MAX_TIME_S,
    STREAM_ID_PATTERN,
    check_stream_id,
    check_text,
    greedy_below_floor,
    top_p_floor,
)
from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.serve.errors import QuestionTooLongError

# A stop string longer than this is no stop string; more than this many is a misuse.
MAX_STOP_CHARS, MAX_STOPS = 256, 16
MAX_ANSWER_TOKENS = 4096  # the engine's own bound (`AskRequest.max_tokens`)

SafeText = Annotated[str, AfterValidator(check_text)]
StopList = Annotated[list[Annotated[SafeText, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                     Field(max_length=MAX_STOPS)]
Seq = Annotated[int, Field(ge=0, le=MAX_SEQ)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEQ)]
StreamTime = Annotated[float, Field(ge=0, le=MAX_TIME_S, allow_inf_nan=False)]
# Below `bounds.MIN_TEMPERATURE` a temperature becomes 0 (greedy); a top_p below `bounds.MIN_TOP_P`
# becomes that floor: the engine never sees a value it cannot sample with.
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False), AfterValidator(greedy_below_floor)]
# OpenAI's range of temperature (0 to 2), with the same floor.
ChatTemperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False), AfterValidator(greedy_below_floor)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False), AfterValidator(top_p_floor)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_ANSWER_TOKENS)]
# The static ceiling; `engine_ask` applies the configured (smaller) `ingress.max_question_chars`.
Question = Annotated[SafeText, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
# The pattern is for OpenAPI; `check_stream_id` is the grammar (whole string, no trailing newline).
StreamIdStr = Annotated[str, Field(pattern=STREAM_ID_PATTERN), AfterValidator(check_stream_id)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- streams
class CreateStreamRequest(_In):
    id: StreamIdStr | None = Field(None, description="stream id; generated when absent")
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
    seq: Seq | None = Field(None, description="batch sequence number; a repeated seq is not re-appended")
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
    text: Annotated[SafeText, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    ts: StreamTime


class TextAck(BaseModel):
    stream_id: str
    ok: bool = True


class AskParams(_In):
    """A question's parameters as the engine's `AskRequest` takes them: the one schema of a question
    on every path (HTTP query, OpenAI chat, WebSocket `response.create`)."""

    question: Question
    max_tokens: MaxTokens = 64
    since: StreamTime | None = Field(None, description="only context after this stream time")
    until: StreamTime | None = Field(None, description="only context before this stream time")
    temperature: Temperature = Field(0.0, description="0: greedy; below 1e-4 is greedy too")
    top_p: TopP = Field(1.0, description="nucleus sampling; below 1e-6 is 1e-6 (the best token alone)")
    stop: StopList = Field(default_factory=list)
    seed: Seed | None = None
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="interactive: TTFT first; batch: after lagging streams' frames")

    @model_validator(mode="after")
    def _window(self) -> AskParams:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since must be <= until")
        return self


class QueryIn(AskParams):
    stream: bool = Field(False, description="answer as server-sent events")

    def ask_params(self) -> dict[str, Any]:
        """Keyword arguments of the engine's `AskRequest`."""
        return self.model_dump(exclude={"stream"})


def check_question_length(question: str, max_question_chars: int) -> None:
    """`QuestionTooLongError` (413) for a question over `ingress.max_question_chars`."""
    if len(question) > max_question_chars:
        raise QuestionTooLongError(f"a question is at most {max_question_chars} characters "
                                   f"(ingress.max_question_chars), got {len(question)}")


def engine_ask(params: dict[str, Any], max_question_chars: int) -> dict[str, Any]:
    """The engine's `AskRequest` keyword arguments for `params`, checked the one way every path
    checks a question: `QuestionTooLongError` (413) over `max_question_chars`, then `AskParams`'s
    bounds (`InvalidInputError`, 422). Long questions are refused before any tokenizer sees them."""
    question = params.get("question")
    if isinstance(question, str):
        check_question_length(question, max_question_chars)
    try:
        return AskParams.model_validate(params).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInputError(f"{where or 'question'}: {first.get('msg')}") from None


class QueryAnswer(BaseModel):
    stream_id: str
    answer: str
    deltas: int = Field(description="text deltas the engine produced (about one per token)")
    ttft_ms: float = Field(description="question reaching its shard -> first delta")
    latency_ms: float = Field(description="request in the ingress -> answer complete")
    finish_reason: str = Field("stop", description='"stop" (end of text or a stop string) or "length" (max_tokens)')
    usage: dict[str, int] | None = Field(None, description="prompt_tokens, completion_tokens, total_tokens (the engine's)")


# ---------------------------------------------------------------------- service
class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    shards: dict[str, str]
