"""BodyLimit: an ASGI middleware that bounds every request body in size (413) and in time (408).

Why a middleware: FastAPI reads a JSON body whole, before any dependency or route code runs, so a
route cannot refuse a huge or a slow JSON body in time. Here every route is covered, JSON or not:

- a `Content-Length` over the limit is refused before a byte of the body is read;
- a body without one (chunked) is counted as it arrives; the read that passes the limit raises
  `PayloadTooLargeError`, and whatever the application then answers (FastAPI turns a failed body
  read into a 400) is replaced by the 413;
- a body whose next chunk takes longer than `idle_s`, or which is not complete `total_s` after
  its headers arrived (a slow drip), is refused the same way with a 408 `request_timeout`.

Invariants: at most `limit + one chunk` bytes of a request body are ever held, no body read waits
past its deadline, and a refused request reached no route code past its body read, so it changed
nothing. Reads after the body is complete (a streamed answer waiting for a disconnect) are not
timed. Header reads happen before any ASGI code runs: uvicorn bounds them only by its keep-alive
timer, so a slow-drip of headers is for a fronting proxy to cut (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from mosaic_ray.serve.errors import ApiError, PayloadTooLargeError, RequestTimeoutError, error_response

Scope = dict[str, Any]


class BodyLimit:
    def __init__(self, app: Any, limit: Callable[[], int],
                 timeouts: Callable[[], tuple[float, float]] | None = None) -> None:
        """`limit()`: bytes; `timeouts()`: (idle_s, total_s). Both are read per request: the
        replica's config decides."""
        self.app = app
        self.limit = limit
        self.timeouts = timeouts

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        idle_s, total_s = self.timeouts() if self.timeouts is not None else (None, None)
        deadline = None if total_s is None else time.monotonic() + total_s
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, PayloadTooLargeError(f"body of {declared} bytes exceeds {limit}"))
            return
        state: dict[str, Any] = {"read": 0, "done": False, "refusal": None, "answered": False}

        async def bounded_receive() -> dict:
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), _wait_s(idle_s, deadline))
            except TimeoutError:
                state["refusal"] = RequestTimeoutError(
                    f"the request body did not arrive in time (a chunk every {idle_s:g} s, all of it "
                    f"within {total_s:g} s)")
                raise state["refusal"] from None
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if state["read"] > limit:
                    state["refusal"] = PayloadTooLargeError(f"body exceeds {limit} bytes")
                    raise state["refusal"]
            return message

        async def guarded_send(message: dict) -> None:
            if state["refusal"] is None:
                await send(message)
            elif not state["answered"] and message["type"] == "http.response.start":
                state["answered"] = True
                await _refuse(send, state["refusal"])

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if state["refusal"] is None:
                raise
        if state["refusal"] is not None and not state["answered"]:
            await _refuse(send, state["refusal"])


def _wait_s(idle_s: float | None, deadline: float | None) -> float | None:
    waits = [w for w in (idle_s, None if deadline is None else max(0.0, deadline - time.monotonic())) if w is not None]
    return min(waits) if waits else None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _refuse(send: Callable, exc: ApiError) -> None:
    response = error_response(exc.status, exc.code, str(exc))
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": [*response.raw_headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": response.body})
