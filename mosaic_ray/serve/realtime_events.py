"""Events of the realtime WebSocket protocol (`/v1/realtime`, docs/realtime.md).

Client events are JSON text messages validated here (pydantic, extra fields refused); names follow
the OpenAI realtime protocol where it fits. Every field a client sets has the type and bounds of
its HTTP twin (`schemas.py`: `Seq`, `Seed`, `StreamTime`, `Temperature`, `TopP`, `SafeText`,
`StreamIdStr`, ...), and a question reaches its shard through `schemas.engine_ask`, as over HTTP.
A binary message is one frame batch in the msgpack
format of `POST /v1/streams/{id}/frames`. Server events are plain dicts built by `server_event`.

    client                          server
    session.update                  session.created (on connect), session.updated
    input_video_frame.append        input_video_frame.appended   (one ack per append, with seq)
      (alias input_image_buffer.append; or a binary msgpack batch)
    input_video_buffer.commit       input_video_buffer.committed (every earlier append acked)
    conversation.item.create        conversation.item.created
    response.create                 response.created, response.output_text.delta ...,
                                    response.output_text.done, response.done
    response.cancel                 response.done (status "cancelled")
    ping                            pong; heartbeat (every heartbeat_s)
    session.close                   session.closed, then close code 1000
                                    error (code, message, event_id: the session stays usable)

`response.done` ends every answer once, with `response` = `RESPONSE_DONE_FIELDS` (below): how it
ended and what it used, with the meaning of the HTTP and OpenAI paths (`answer_end.py`).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from mosaic_ray.serve.schemas import (
    MAX_TEXT_CHARS,
    MaxTokens,
    Question,
    SafeText,
    Seed,
    Seq,
    StopList,
    StreamIdStr,
    StreamTime,
    Temperature,
    TopP,
)


class EventError(Exception):
    """A client event the session refuses; becomes an `error` event, the session goes on."""

    def __init__(self, code: str, message: str, event_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.event_id = code, message, event_id


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_id: str | None = Field(None, max_length=128, description="echoed in the answer's events and errors")


# ---------------------------------------------------------------------- session
class SessionOptions(BaseModel):
    """What `session.update` may set. Absent fields keep their value."""

    model_config = ConfigDict(extra="forbid")
    stream_id: StreamIdStr | None = Field(None, description="attach to this stream, created when it does not exist")
    new_stream: bool = Field(False, description="create a new stream with a generated id")
    pruning: bool | None = Field(None, description="the stream's redundant-frame pruning switch")
    prune_threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    # Defaults of this session's questions (response.create may override each).
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopList | None = None
    seed: Seed | None = None


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionOptions = Field(default_factory=SessionOptions)


class SessionClose(_Event):
    type: Literal["session.close"]


class Ping(_Event):
    type: Literal["ping"]


# ---------------------------------------------------------------------- input
class FrameAppend(_Event):
    """One JPEG or PNG frame, base64 in `image` (a `data:image/...;base64,` prefix is accepted)."""

    type: Literal["input_video_frame.append", "input_image_buffer.append"]
    ts: StreamTime = Field(description="stream-clock seconds")
    seq: Seq | None = Field(None, description="retry-safe ingest: as the HTTP batches' seq")
    image: str = Field(min_length=4)

    @field_validator("image")
    @classmethod
    def _strip_data_url(cls, value: str) -> str:
        return value.split(",", 1)[1] if value.startswith("data:") else value

    def image_bytes(self) -> tuple[bytes, str]:
        """The decoded image and its content type, sniffed from the magic bytes."""
        try:
            data = base64.b64decode(self.image, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("malformed_event", "image is not valid base64", self.event_id) from None
        if data.startswith(b"\xff\xd8"):
            return data, "image/jpeg"
        if data.startswith(b"\x89PNG"):
            return data, "image/png"
        raise EventError("malformed_event", "image is neither JPEG nor PNG", self.event_id)


class VideoCommit(_Event):
    type: Literal["input_video_buffer.commit", "input_video.commit"]


class TextPart(BaseModel):
    """A text part of a realtime message (the realtime API has text parts only; OpenAI chat's
    parts, images included, are `openai_compat.ContentPart`)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text", "text"] = "input_text"
    text: Annotated[SafeText, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class Item(BaseModel):
    """A message. role `user`: the question of the next `response.create`; role `system`: text
    added to the stream's context at `ts` (a caption, a transcript line)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["user", "system"] = "user"
    content: list[TextPart] = Field(min_length=1, max_length=16)

    def text(self) -> str:
        return " ".join(p.text for p in self.content)


class ItemCreate(_Event):
    type: Literal["conversation.item.create"]
    item: Item
    ts: StreamTime | None = Field(None, description="stream-clock time of system text (default: the session's last frame)")


# ---------------------------------------------------------------------- responses
class ResponseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: Question | None = Field(None, description="default: the last user item's text")
    instructions: Question | None = Field(None, description="an alias of question (OpenAI's name)")
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopList | None = None
    seed: Seed | None = None
    since: StreamTime | None = None
    until: StreamTime | None = None


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseOptions = Field(default_factory=ResponseOptions)


class ResponseCancel(_Event):
    type: Literal["response.cancel"]


ClientEvent = Annotated[
    Union[SessionUpdate, SessionClose, Ping, FrameAppend, VideoCommit, ItemCreate, ResponseCreate, ResponseCancel],
    Field(discriminator="type"),
]
_CLIENT_EVENT = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES = sorted(
    value
    for model in (SessionUpdate, SessionClose, Ping, FrameAppend, VideoCommit, ItemCreate, ResponseCreate, ResponseCancel)
    for value in model.model_fields["type"].annotation.__args__
)


def parse_event(text: str) -> Any:
    """A client event from a text message, or `EventError("malformed_event")` naming what is wrong."""
    try:
        raw = json.loads(text)
    except ValueError:
        raise EventError("malformed_event", "message is not valid JSON") from None
    event_id = raw.get("event_id") if isinstance(raw, dict) else None
    event_id = event_id if isinstance(event_id, str) else None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise EventError("malformed_event", "an event is a JSON object with a string `type`", event_id)
    if raw["type"] not in CLIENT_EVENT_TYPES:
        raise EventError("unknown_event", f"unknown event type {raw['type']!r}; known: {CLIENT_EVENT_TYPES}", event_id)
    try:
        return _CLIENT_EVENT.validate_python(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg', '')}" for e in exc.errors()[:3]]
        raise EventError("malformed_event", f"invalid {raw['type']}: " + "; ".join(parts), event_id) from None


# ---------------------------------------------------------------------- server events
_ids = itertools.count(1)

# The `response` object of `response.done`, field by field (docs/realtime.md has the same table).
RESPONSE_DONE_FIELDS: dict[str, str] = {
    "id": "the response's id (`resp_...`), as in response.created and every delta's response_id",
    "status": '"completed" (the engine ended it: finish_reason stop or length), "cancelled" '
              '(response.cancel before the engine\'s end) or "failed" (an `error` event came before)',
    "output_text": "the text of every delta sent, joined",
    "deltas": "how many response.output_text.delta events were sent",
    "finish_reason": '"stop" (an end-of-text token or a stop string), "length" (max_tokens reached), '
                     '"cancelled" (status cancelled) or "error" (status failed)',
    "usage": "{prompt_tokens: the question's prompt tokens fed for this answer (not the stream's context), "
             "completion_tokens: every sampled token, an end-of-text token too, total_tokens: their sum}, "
             "the engine's count as in the OpenAI path; null when the engine counts no tokens or the "
             "answer was cancelled or failed (its count never came)",
    "ttft_ms": "response.create taken up -> first delta (null without one)",
    "latency_ms": "response.create taken up -> response.done",
}


def server_event(type_: str, **fields: Any) -> dict[str, Any]:
    """A server event: `type`, a fresh server `event_id`, then `fields`."""
    return {"type": type_, "event_id": f"evt_{next(_ids)}", **fields}


def error_event(code: str, message: str, event_id: str | None = None, status: int | None = None) -> dict[str, Any]:
    """OpenAI's error shape: the client event it answers is named by `error.event_id`."""
    error = {"type": "invalid_request_error" if (status or 400) < 500 else "server_error", "code": code,
             "message": message, "event_id": event_id}
    if status is not None:
        error["status"] = status
    return server_event("error", error=error)
