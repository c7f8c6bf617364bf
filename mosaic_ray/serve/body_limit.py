"""BodyLimit: an ASGI middleware that answers 413 to any request body over the ingress's limit.

Why a middleware: FastAPI reads a JSON body whole, before any dependency or route code runs, so a
route cannot refuse a huge JSON body in time. Here every route is covered, JSON or not:

- a `Content-Length` over the limit is refused before a byte of the body is read;
- a body without one (chunked) is counted as it arrives; the read that passes the limit raises
  `PayloadTooLargeError`, and whatever the application then answers (FastAPI turns a failed body
  read into a 400) is replaced by the 413.

Invariant: at most `limit + one chunk` bytes of a request body are ever held, and a refused
request reached no route code past its body read, so it changed nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mosaic_ray.serve.errors import PayloadTooLargeError, error_response

Scope = dict[str, Any]


class BodyLimit:
    def __init__(self, app: Any, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit  # read per request: the replica's config decides

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, f"body of {declared} bytes exceeds {limit}")
            return
        state = {"read": 0, "tripped": False, "answered": False}

        async def counted_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > limit:
                    state["tripped"] = True
                    raise PayloadTooLargeError(f"body exceeds {limit} bytes")
            return message

        async def guarded_send(message: dict) -> None:
            if not state["tripped"]:
                await send(message)
            elif not state["answered"] and message["type"] == "http.response.start":
                state["answered"] = True
                await _refuse(send, f"body exceeds {limit} bytes")

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["tripped"]:
                raise
        if state["tripped"] and not state["answered"]:
            await _refuse(send, f"body exceeds {limit} bytes")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _refuse(send: Callable, message: str) -> None:
    response = error_response(PayloadTooLargeError.status, PayloadTooLargeError.code, message)
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": [*response.raw_headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": response.body})
