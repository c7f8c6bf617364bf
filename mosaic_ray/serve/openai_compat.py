"""OpenAI-compatible /v1/chat/completions over a stream: the request names the stream, the last user
message is the question.

Mapping (what a client of the `openai` package sees):
- `model` names the stream (or the extra field `stream_id`, which wins; the `openai` client sends
  it with `extra_body={"stream_id": ...}`). The response's `model` echoes the request's.
- The question is the text of the last `user` message. Earlier turns are not replayed: the stream
  keeps its own Q/A history in its context. Image parts are refused (push frames instead).
- `max_tokens` or `max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed` pass through,
  with the bounds of every path (`schemas.py`: a temperature below 1e-4 is greedy);
  `since` / `until` (extra fields) restrict the context by stream time. `n` must be 1.
- `stream: true` answers with `chat.completion.chunk` events and `data: [DONE]`; an error after
  the first chunk is sent as `data: {"error": ...}`, which the `openai` client raises.
- `usage` is omitted: the engine reports text deltas, not token counts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mosaic_ray.serve import sse
from mosaic_ray.serve.schemas import (
    MAX_STOP_CHARS,
    MAX_TEXT_CHARS,
    ChatTemperature,
    MaxTokens,
    SafeText,
    Seed,
    StopList,
    StreamIdStr,
    StreamTime,
    TopP,
)

# An OpenAI conversation may be long, but only its last user message is read here.
MAX_MESSAGES = 1024


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)
    text: SafeText | None = Field(None, max_length=MAX_TEXT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: accepted, unused
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[SafeText, Field(max_length=MAX_TEXT_CHARS)] | list[ContentPart] | None = Field(
        None, union_mode="left_to_right")

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content parts of type {part.type!r} are not supported; push frames to the stream")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(BaseModel):
    # Fields of the OpenAI API that do not apply here (user, logprobs, ...) are accepted and ignored.
    model_config = ConfigDict(extra="allow")
    model: SafeText = Field(min_length=1, max_length=256, description="the stream id (unless stream_id is given)")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_id: StreamIdStr | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: ChatTemperature | None = None
    top_p: TopP | None = None
    stop: Annotated[SafeText, Field(max_length=MAX_STOP_CHARS)] | StopList | None = None
    seed: Seed | None = None
    n: int | None = Field(None, ge=1, le=1)
    since: StreamTime | None = None
    until: StreamTime | None = None

    @model_validator(mode="after")
    def _has_question(self) -> ChatCompletionRequest:
        users = [m for m in self.messages if m.role == "user"]
        if not users or not users[-1].text().strip():
            raise ValueError("messages need a user message with text: it is the question")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since must be <= until")
        return self

    @property
    def target(self) -> str:
        return self.stream_id or self.model

    def ask_params(self) -> dict[str, Any]:
        """Keyword arguments of the engine's `AskRequest`."""
        question = [m for m in self.messages if m.role == "user"][-1].text()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params: dict[str, Any] = {
            "question": question,
            "max_tokens": self.max_completion_tokens or self.max_tokens or 64,
            "stop": stop,
            "since": self.since,
            "until": self.until,
            "seed": self.seed,
        }
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        return params


def _id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": _id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


async def chunk_events(model: str, deltas: AsyncIterator[str], on_error) -> AsyncIterator[bytes]:
    """The SSE body of a streamed completion; `on_error(exc)` gives the error JSON to send."""
    cid, created = _id(), int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse.event({
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for text in deltas:
            yield chunk({"content": text})
    except Exception as exc:
        yield sse.event(on_error(exc))
        return
    yield chunk({}, "stop")
    yield sse.event("[DONE]")
