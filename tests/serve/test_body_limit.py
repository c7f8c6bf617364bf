"""BodyLimit alone (no Ray): a slow-drip body is refused with 408 in bounded time, a body that is
too large with 413, and a prompt body passes (issue 20, item 9)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi import FastAPI, Request

from mosaic_ray.serve.body_limit import BodyLimit
from mosaic_ray.serve.errors import install_error_handlers

IDLE_S, TOTAL_S = 0.3, 1.0
LIMIT = 1 << 16


def _app() -> BodyLimit:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    return BodyLimit(app, limit=lambda: LIMIT, timeouts=lambda: (IDLE_S, TOTAL_S))


async def _call(chunks, gap_s: float, forever: bool = False) -> tuple[int, dict, float]:
    """POST `chunks` with `gap_s` between them (then nothing, when `forever`); status, body, seconds."""
    scope = {"type": "http", "method": "POST", "path": "/echo", "raw_path": b"/echo", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
             "server": ("t", 80), "client": ("c", 1), "root_path": ""}
    todo = list(chunks)
    sent: list[dict] = []

    async def receive() -> dict:
        if not todo:
            await asyncio.sleep(3600 if forever else 0)
            return {"type": "http.disconnect"}
        await asyncio.sleep(gap_s)
        body = todo.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(todo) or forever}

    async def send(message: dict) -> None:
        sent.append(message)

    start = time.monotonic()
    await asyncio.wait_for(_app()(scope, receive, send), 10)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), time.monotonic() - start


def test_a_body_that_stops_arriving_is_408_after_the_idle_timeout():
    status, body, took = asyncio.run(_call([b'{"a": '], 0.0, forever=True))
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert IDLE_S <= took < IDLE_S + 2


def test_a_slow_drip_body_is_408_after_the_total_timeout():
    status, body, took = asyncio.run(_call([b" "] * 1000, IDLE_S / 3))
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert TOTAL_S <= took < TOTAL_S + 2


@pytest.mark.parametrize("chunks,status", [([b'{"a": ', b"1}"], 200), ([b" " * LIMIT, b" "], 413)])
def test_prompt_bodies_pass_and_large_ones_are_413(chunks, status):
    got, _, took = asyncio.run(_call(chunks, 0.01))
    assert got == status and took < IDLE_S
