"""The engine's public interface: what the Ray runtime and the CLI may call.

Everything above the engine (ShardActor, Router, Serve app, demo) talks to an engine only through
these verbs, so tests can inject a fake and a shard can host any engine that honours them:

    open_stream / close_stream / has_stream / list_streams
    configure_stream          (per-stream options; optional: the default takes none)
    append_frames / append_text
    ask                       (async iterator of text deltas)
    ask_until_end             (the same deltas, then one `AnswerEnd`: why it ended, tokens used)
    stream_info / stats
    export_stream / import_stream   (whole-stream migration between shards)
    export_delta / import_deltas    (incremental snapshots: a base, then what changed since;
                                     optional: the defaults export whole and import one part)
    probe                     (a known-good request: is the engine itself healthy?)

Invariants every engine keeps:
- A call that raises leaves the stream exactly as it was (no half-appended frames).
- `append_frames` returns only after the frames are part of the stream's context.
- Streams are isolated: nothing done to one stream changes another's answers.
- `export_stream` followed by `import_stream` on another engine gives identical greedy answers.
- `import_deltas([export_delta(s, 0), export_delta(s, g1), ..., export_delta(s, gk)])`, each
  `g` the previous part's meta["generation"], gives the stream `import_stream(export_stream(s))`
  would at the last part.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mosaic_ray.bounds import MAX_SEQ


# The scratch stream of `Engine.probe`: stream ids of clients start with a letter or digit.
PROBE_STREAM = "__probe__"
PROBE_TEXT = "probe"


class EngineError(Exception):
    """Base of the errors an engine raises on bad requests; `code` maps to an HTTP status."""

    code = "bad_request"
    status = 400


class UnknownStreamError(EngineError, KeyError):
    code = "stream_not_found"
    status = 404

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown stream"


class StreamExistsError(EngineError):
    code = "stream_exists"
    status = 409


class InvalidInputError(EngineError, ValueError):
    code = "invalid_input"
    status = 422


class StreamBusyError(EngineError):
    """The stream is answering a question; the call may be retried shortly."""

    code = "stream_busy"
    status = 409


class OverloadedError(EngineError):
    """A bound (streams per engine, frames waiting for a question) is reached; retry later."""

    code = "overloaded"
    status = 503


class BatchPartlyAppliedError(Exception):
    """A batched append failed after some of its streams committed their frames. `applied` maps
    each of those streams to the frames it holds (what `append_frames` returns); every other
    stream of the batch is unchanged, and `cause` is the failure. Never raised for one entry."""

    def __init__(self, applied: dict[str, int], cause: BaseException) -> None:
        super().__init__(applied, cause)
        self.applied, self.cause = applied, cause

    def __str__(self) -> str:
        return f"{len(self.applied)} stream(s) appended before the batch failed: {self.cause!r}"


@dataclass(slots=True)
class AskRequest:
    """One question to one stream. `since`/`until` (seconds, stream clock) restrict retrieval."""

    question: str
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    since: float | None = None
    until: float | None = None
    seed: int | None = None
    # "interactive" (TTFT first: its prefill goes before lagging streams' frames) or "batch"
    # (after them); see engine/scheduler.py
    priority: str = "interactive"

    def __post_init__(self) -> None:
        if self.priority not in ("interactive", "batch"):
            raise InvalidInputError(f"priority must be 'interactive' or 'batch', got {self.priority!r}")
        if not isinstance(self.question, str) or not self.question.strip():
            raise InvalidInputError("question must be a non-empty string")
        if not 1 <= self.max_tokens <= 4096:
            raise InvalidInputError(f"max_tokens must be in [1, 4096], got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 10.0:
            raise InvalidInputError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEQ:
            raise InvalidInputError("seed must be in [0, 2**63-1]")  # torch's generators take no more
        if self.since is not None and self.until is not None and self.since > self.until:
            raise InvalidInputError(f"since ({self.since}) must be <= until ({self.until})")


# Why an answer ended, as OpenAI's `finish_reason` says it: an end-of-text token or a stop string
# ("stop"), max_tokens reached ("length"), the asker stopped reading ("cancelled": nobody is left
# to tell, so HTTP never sends it; it shows in `Answer.finish_reason`).
FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(slots=True, frozen=True)
class AnswerEnd:
    """The last item of `Engine.ask_until_end`. Token counts are None when the engine does not count
    tokens; `completion_tokens` counts every sampled token, an end-of-text token too (as vLLM does:
    it is what max_tokens bounds), `prompt_tokens` the question's prompt fed for this answer (the
    stream's context is not counted: it is the stream's, already in its cache)."""

    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")

    def as_dict(self) -> dict[str, Any]:
        """What the shard sends: {"finish_reason", "usage": {prompt, completion, total tokens} or None}."""
        if self.prompt_tokens is None or self.completion_tokens is None:
            return {"finish_reason": self.finish_reason, "usage": None}
        return {"finish_reason": self.finish_reason, "usage": {
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens}}


class Engine(abc.ABC):
    """A single-device engine holding many streams."""

    # True when frames and texts of a stream may be appended while it answers, once the answer's
    # first text came out (its context is fixed from the prefill on): the shard then releases the
    # stream's lock at the first delta instead of holding it for the whole answer.
    appends_during_answers: bool = False

    @abc.abstractmethod
    def open_stream(self, stream_id: str) -> None: ...

    @abc.abstractmethod
    def close_stream(self, stream_id: str) -> None: ...

    @abc.abstractmethod
    def has_stream(self, stream_id: str) -> bool: ...

    @abc.abstractmethod
    def list_streams(self) -> list[str]: ...

    def configure_stream(self, stream_id: str, options: dict[str, Any]) -> dict[str, Any]:
        """Set per-stream options (StreamEngine: `pruning`, `prune_threshold`); returns the stream's
        options after the change. This default takes none: any option is refused."""
        if not self.has_stream(stream_id):
            raise UnknownStreamError(f"stream {stream_id!r} not found")
        if options:
            raise InvalidInputError(f"this engine takes no stream options, got {sorted(options)}")
        return {}

    @abc.abstractmethod
    def append_frames(self, stream_id: str, frames: list[np.ndarray], timestamps: list[float]) -> int:
        """Add RGB uint8 frames [H, W, 3] with their stream-clock timestamps; returns frames held."""

    @abc.abstractmethod
    def append_text(self, stream_id: str, text: str, timestamp: float) -> None:
        """Add timestamped text (caption, transcript line) to the stream's context."""

    @abc.abstractmethod
    def ask(self, stream_id: str, request: AskRequest) -> AsyncIterator[str]:
        """Answer a question about the stream; yields text deltas. The Q/A joins the context."""

    async def ask_until_end(self, stream_id: str, request: AskRequest) -> AsyncIterator[str | AnswerEnd]:
        """`ask`'s deltas, then one `AnswerEnd` once the answer is complete. This default knows no
        more than the deltas: "stop", no token counts; engines that know why they stopped override it."""
        async for delta in self.ask(stream_id, request):
            yield delta
        yield AnswerEnd()

    @abc.abstractmethod
    def stream_info(self, stream_id: str) -> dict[str, Any]:
        """frames, tokens, duration_s, kv_bytes_device, kv_bytes_host, ..."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Engine-wide load: streams, kv_bytes_device, kv_bytes_host, frames_total, ..."""

    @abc.abstractmethod
    def export_stream(self, stream_id: str) -> dict[str, Any]:
        """The stream's whole state as {"meta": {...plain data...}, "tensors": {name: Tensor}}."""

    @abc.abstractmethod
    def import_stream(self, stream_id: str, state: dict[str, Any]) -> None:
        """Install a stream exported by `export_stream` (of an engine with the same model)."""

    def export_delta(self, stream_id: str, since: int) -> dict[str, Any]:
        """A snapshot part: the stream's state with only what changed after the part whose
        meta["generation"] was `since` (0: everything, a base). meta["generation"] names this
        part for the next one; a part without it is whole (this default: no increments, so the
        caller writes every snapshot whole)."""
        return self.export_stream(stream_id)

    def import_deltas(self, stream_id: str, parts: list[dict[str, Any]]) -> None:
        """Install a stream from a base and the deltas after it, in order (`export_delta`). This
        default takes one whole part."""
        if len(parts) != 1:
            raise InvalidInputError(f"this engine imports one whole snapshot, got {len(parts)} parts")
        self.import_stream(stream_id, parts[0])

    def probe(self) -> None:
        """Run a known-good request; raise (anything but an `EngineError`) if the engine itself is
        broken. The shard calls it after a request raised something unexpected, to tell a bad
        request from a broken engine. This default opens a scratch stream (`PROBE_STREAM`: no
        client id can take it), gives it one short text (a forward on the device), and closes it.
        An `EngineError` here (the engine is full, say) is an engine answering sanely: healthy."""
        if self.has_stream(PROBE_STREAM):
            self.close_stream(PROBE_STREAM)
        self.open_stream(PROBE_STREAM)
        try:
            self.append_text(PROBE_STREAM, PROBE_TEXT, 0.0)
            self.stats()
        finally:
            self.close_stream(PROBE_STREAM)
