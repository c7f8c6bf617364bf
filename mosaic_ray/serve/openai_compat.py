"""OpenAI-compatible request bodies: /v1/chat/completions and /v1/completions over a stream.

Mapping (what a client of the `openai` package sees):
- `model` names the stream (or the extra field `stream_id`, which wins; the `openai` client sends
  it with `extra_body={"stream_id": ...}`). The response's `model` echoes the request's.
- Chat: the question is the text of the last `user` message. Earlier user and assistant turns are
  not replayed: the stream keeps its own Q/A history in its context. Completions: `prompt` (one
  string) is the question.
- System (and developer) messages are context text prepended to the question, not appended to the
  stream: a chat client resends its system prompt with every request, so appending it would pile
  copies into the stream's shared, persistent context (and its frame log) and change what every
  later asker of the stream gets; prepended, it shapes this answer only, and counts against the
  question's bounds like the rest of the question.
- `image_url` parts of the last user message (data URLs: base64 JPEG or PNG) are appended to the
  stream as frames at the message's time (the extra field `ts`, else the stream's clock), with the
  bounds of the frames route, then the question is answered. Images of earlier turns are taken as
  already sent (a chat client resends its history: appending them again would duplicate frames).
- `max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`, `stop`, `seed` pass through,
  with the bounds of every path (`schemas.engine_ask`); `since` / `until` (extra fields) restrict
  the context by stream time.
- A field this server cannot honour is a 400 naming it (`unsupported_field`), never silently
  ignored: `UNSUPPORTED` lists the OpenAI fields accepted at their no-op value only (logprobs=false,
  n=1, tools=[], response_format text, ...); any other field is refused, but `IGNORED` (`user`).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.serve.errors import ApiError
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
# OpenAI's legacy completions default; chat's default is ours (64), as before.
COMPLETION_DEFAULT_MAX_TOKENS = 16
CHAT_DEFAULT_MAX_TOKENS = 64

# OpenAI fields accepted only at a value that asks for nothing (None is always accepted).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,), "top_logprobs": (0,), "n": (1,), "best_of": (1,), "echo": (False,),
    "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
    "parallel_tool_calls": (False, True), "functions": ([],), "function_call": ("none",),
    "modalities": (["text"],), "audio": (), "prediction": (), "web_search_options": (),
    "reasoning_effort": (), "min_p": (0,), "top_k": (-1, 0),
}
IGNORED = frozenset({"user"})  # an end-user id for the caller's own records: nothing to honour
DATA_URL = re.compile(r"^data:(image/(?:jpeg|jpg|png));base64,(.*)$", re.DOTALL)


class UnsupportedFieldError(ApiError):
    """A request field this server cannot honour: refused by name rather than silently ignored."""

    code = "unsupported_field"
    status = 400


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="allow")  # detail: a hint for the model's resizing, unused
    url: str = Field(description="a data URL, data:image/jpeg|png;base64,...")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)
    text: SafeText | None = Field(None, max_length=MAX_TEXT_CHARS)
    image_url: ImageUrl | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: of turns not replayed
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[SafeText, Field(max_length=MAX_TEXT_CHARS)] | list[ContentPart] | None = Field(
        None, union_mode="left_to_right")
    ts: StreamTime | None = Field(None, description="stream time of this message's images (default: the stream's clock)")

    def parts(self) -> list[ContentPart]:
        if self.content is None or isinstance(self.content, str):
            return [ContentPart(type="text", text=self.content or "")]
        return self.content

    def text(self) -> str:
        return "".join(p.text or "" for p in self.parts() if p.type == "text")


def decode_image(url: str) -> tuple[str, bytes]:
    """(content type, bytes) of a data URL image; a remote URL is unsupported (nothing is fetched)."""
    m = DATA_URL.match(url)
    if m is None:
        if url.startswith(("http://", "https://")):
            raise UnsupportedFieldError("image_url: remote URLs are not fetched; send a data URL (base64 JPEG or PNG)")
        raise InvalidInputError("image_url must be a data URL: data:image/jpeg|png;base64,...")
    try:
        data = base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("image_url: the data URL's base64 is malformed") from None
    return ("image/jpeg" if m.group(1) in ("image/jpeg", "image/jpg") else "image/png"), data


class _OpenAIRequest(BaseModel):
    """Fields both routes share. Extra fields are kept (`model_extra`) so `refuse_unsupported` can
    name them: pydantic's 422 would not say which OpenAI feature is missing."""

    model_config = ConfigDict(extra="allow")
    model: SafeText = Field(min_length=1, max_length=256, description="the stream id (unless stream_id is given)")
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(None, description='{"include_usage": true}: a final usage chunk')
    stream_id: StreamIdStr | None = None
    max_tokens: MaxTokens | None = None
    temperature: ChatTemperature | None = None
    top_p: TopP | None = None
    stop: Annotated[SafeText, Field(max_length=MAX_STOP_CHARS)] | StopList | None = None
    seed: Seed | None = None
    since: StreamTime | None = None
    until: StreamTime | None = None

    @model_validator(mode="after")
    def _window(self) -> _OpenAIRequest:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since must be <= until")
        return self

    @property
    def target(self) -> str:
        return self.stream_id or self.model

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def unsupported(self) -> list[str]:
        """Names of the fields asking for what this server cannot do."""
        bad = []
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED or value is None:
                continue
            if name not in UNSUPPORTED or value not in UNSUPPORTED[name]:
                bad.append(name)
        if set(self.stream_options or {}) - {"include_usage"}:
            bad.append("stream_options." + ",".join(sorted(set(self.stream_options) - {"include_usage"})))
        return bad

    def refuse_unsupported(self) -> None:
        bad = self.unsupported()
        if bad:
            raise UnsupportedFieldError(
                f"unsupported field(s): {', '.join(bad)} (this server answers in text, one choice, "
                "without log-probabilities, penalties or tools; see docs/api.md)")

    def _params(self, question: str, default_max_tokens: int) -> dict[str, Any]:
        """Keyword arguments of the engine's `AskRequest` (checked by `schemas.engine_ask`)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params: dict[str, Any] = {
            "question": question,
            "max_tokens": self.max_tokens or default_max_tokens,
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


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: MaxTokens | None = None

    @model_validator(mode="after")
    def _has_question(self) -> ChatCompletionRequest:
        users = [m for m in self.messages if m.role == "user"]
        if not users or not users[-1].text().strip():
            raise ValueError("messages need a user message with text: it is the question")
        return self

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        for i, m in enumerate(self.messages):
            for j, p in enumerate(m.parts()):
                if p.type not in ("text", "image_url"):
                    bad.append(f"messages[{i}].content[{j}].type={p.type}")
                elif p.type == "image_url" and m.role != "user":
                    bad.append(f"messages[{i}].content[{j}] (images of {m.role} messages)")
        return bad

    @property
    def last_user(self) -> ChatMessage:
        return [m for m in self.messages if m.role == "user"][-1]

    def images(self) -> list[str]:
        """The data URLs of the last user message, in order."""
        return [p.image_url.url for p in self.last_user.parts() if p.type == "image_url" and p.image_url]

    def question(self) -> str:
        """The system context, then the question (see the module docstring for why prepended)."""
        system = "\n".join(t for m in self.messages if m.role in ("system", "developer") and (t := m.text().strip()))
        question = self.last_user.text()
        return f"{system}\n\n{question}" if system else question

    def ask_params(self) -> dict[str, Any]:
        params = self._params(self.question(), CHAT_DEFAULT_MAX_TOKENS)
        if self.max_completion_tokens:
            params["max_tokens"] = self.max_completion_tokens
        return params


class CompletionRequest(_OpenAIRequest):
    prompt: Annotated[SafeText, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | list[
        Annotated[SafeText, Field(min_length=1, max_length=MAX_TEXT_CHARS)]] = Field(
        union_mode="left_to_right", description="the question (one string; a list of one string)")

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            bad.append("prompt (a batch of prompts: send one string)")
        return bad

    def ask_params(self) -> dict[str, Any]:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return self._params(prompt, COMPLETION_DEFAULT_MAX_TOKENS)
