"""Server-sent events of streamed answers, through sse-starlette's `EventSourceResponse`.

What the library does for us: each event's framing (`event:` / `data:` lines, a line per line of
data, the blank line that ends it), the `text/event-stream` response with `X-Accel-Buffering: no`
(proxies such as nginx must not buffer a token stream), a comment line (`: ping ...`, which SSE
readers skip) every `PING_S` seconds so an idle connection is not cut by a proxy, and cancelling
the event generator when the client disconnects (it watches for ASGI's `http.disconnect`).

What we set: `\\n` line ends, so a chunk is exactly OpenAI's `data: {json}\\n\\n` (the library's
default is `\\r\\n`), and `Cache-Control: no-cache`. The JSON is ours, not the library's
`JSONServerSentEvent`: that one writes non-ASCII as is, and a lone surrogate (text may carry one,
app.py reads text with "surrogatepass") would fail to encode mid-stream; escaped ASCII never does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

SEP = "\n"
PING_S = 15.0
HEADERS = {"Cache-Control": "no-cache"}


def event(data: Any, name: str | None = None) -> ServerSentEvent:
    """One event; `data` is sent as JSON unless it is already a string (OpenAI's final "[DONE]")."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return ServerSentEvent(payload, event=name, sep=SEP)


def response(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """The streamed response of `events`."""
    return EventSourceResponse(events, headers=HEADERS, sep=SEP, ping=PING_S)
