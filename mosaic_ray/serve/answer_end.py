"""Why an answer ended and what it used: `finish_reason` and `usage`, the same on every API path.

There is one source: the engine's `AnswerEnd` (engine/interface.py), which the shard sends as the
dict {"finish_reason", "usage"} (`AnswerEnd.as_dict`): the last item of `ask(..., with_end=True)`,
and merged into the reply of `answer`. `POST /v1/streams/{id}/query`, the OpenAI routes and the
realtime WebSocket (`response.done`) all read it through `end_of`, so the fields mean the same
everywhere:

- `finish_reason`: "stop" (an end-of-text token or a stop string) or "length" (max_tokens reached),
  as the engine says; an answer that ended before the engine's end item reached the ingress has
  "cancelled" (the client stopped it: realtime `response.cancel`) or "error" (it failed), from
  `cut_short`.
- `usage`: {"prompt_tokens": the question's prompt tokens fed for this answer (the stream's
  context is not counted: it is already in the stream's cache), "completion_tokens": every sampled
  token, an end-of-text token too (what max_tokens bounds), "total_tokens": their sum}; None when
  the engine counts no tokens, and for an answer cut short (its counts never reach the ingress).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mosaic_ray.engine.interface import AnswerEnd

# What an engine that reports nothing gives (`Engine.ask_until_end`'s default): "stop", no usage.
DEFAULT_END: dict[str, Any] = AnswerEnd().as_dict()


def is_end(item: Any) -> bool:
    """True for the shard's end item in a streamed answer (the other items are text deltas, str)."""
    return isinstance(item, Mapping)


def end_of(reply: Mapping[str, Any] | None) -> dict[str, Any]:
    """{"finish_reason", "usage"} of the shard's end item or `answer` reply; `DEFAULT_END` when the
    answer came without one."""
    if reply is None:
        return dict(DEFAULT_END)
    return {"finish_reason": reply.get("finish_reason", DEFAULT_END["finish_reason"]), "usage": reply.get("usage")}


def cut_short(reason: str) -> dict[str, Any]:
    """The end of an answer stopped before the engine's end came ("cancelled", "error"): no usage."""
    return {"finish_reason": reason, "usage": None}
