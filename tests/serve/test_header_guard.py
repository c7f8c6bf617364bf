"""HeaderGuard in front of a real uvicorn (as Serve's proxy runs it): requests of every framing and
a WebSocket pass through unchanged, keep-alive included; a slow-drip head is 408 in bounded time
and an oversized one 431, before the app sees anything; an idle connection is closed."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from mosaic_ray.serve.header_guard import GuardLimits, HeaderGuard

LIMITS = GuardLimits(header_timeout_s=1.0, idle_timeout_s=2.0, max_header_bytes=4096)


def _app(calls: list[str]) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        calls.append(request.method)
        return JSONResponse({"method": request.method, "len": len(body), "sum": sum(body) % 65521,
                             "host": request.headers.get("host")})

    async def ws(socket) -> None:
        await socket.accept()
        async for text in socket.iter_text():
            await socket.send_text(text.upper())

    return Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]), WebSocketRoute("/ws", ws)])


async def _stack(calls: list[str]):
    server = uvicorn.Server(uvicorn.Config(_app(calls), host="127.0.0.1", port=0, lifespan="off", log_level="error"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    guard = HeaderGuard("127.0.0.1", 0, ("127.0.0.1", port), LIMITS)
    await guard.start()

    async def stop() -> None:
        await guard.close()
        server.should_exit = True
        await task

    return guard, port, stop


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_requests_pass_through_unchanged_with_keep_alive():
    async def go():
        calls: list[str] = []
        guard, port, stop = await _stack(calls)
        try:
            body = bytes(range(256)) * 4000  # ~1 MB: several reads and writes
            async def chunks():
                for i in range(0, len(body), 70_000):
                    yield body[i:i + 70_000]

            out = {}
            for name, base in (("guard", guard.port), ("direct", port)):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{base}") as c:  # one connection
                    got = [(await c.get("/echo")).json(),
                           (await c.post("/echo", content=body)).json(),
                           (await c.post("/echo", content=chunks())).json(),  # chunked
                           (await c.post("/echo", content=b"")).json()]
                for g in got:
                    g.pop("host")
                out[name] = got
            assert out["guard"] == out["direct"]
            assert out["guard"][1] == {"method": "POST", "len": len(body), "sum": sum(body) % 65521}
            assert out["guard"][2] == out["guard"][1]
            assert guard.refused == {}
        finally:
            await stop()

    _run(go())


def test_pipelined_requests_on_one_socket_each_get_their_response():
    async def go():
        calls: list[str] = []
        guard, _, stop = await _stack(calls)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", guard.port)
            one = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
            two = b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            writer.write(one + two + b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(-1), 10)
            assert data.count(b"HTTP/1.1 200") == 3
            assert b'"len":3' in data and b'"len":2' in data
            writer.close()
        finally:
            await stop()

    _run(go())


def test_a_slow_drip_head_is_408_in_bounded_time_and_never_reaches_the_app():
    async def go():
        calls: list[str] = []
        guard, _, stop = await _stack(calls)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", guard.port)
            start = time.monotonic()
            writer.write(b"GET /echo HTTP/1.1\r\n")

            async def drip():
                for i in range(100):
                    await asyncio.sleep(0.2)
                    writer.write(f"x-drip-{i}: 1\r\n".encode())

            dripping = asyncio.create_task(drip())
            data = await asyncio.wait_for(reader.read(-1), 10)
            took = time.monotonic() - start
            dripping.cancel()
            status, _, rest = data.partition(b"\r\n")
            assert status == b"HTTP/1.1 408 Request Timeout"
            assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
            assert LIMITS.header_timeout_s <= took < LIMITS.header_timeout_s + 1.5
            assert calls == [] and guard.refused == {408: 1}
        finally:
            await stop()

    _run(go())


def test_an_oversized_head_is_431_and_an_idle_connection_is_closed():
    async def go():
        calls: list[str] = []
        guard, _, stop = await _stack(calls)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", guard.port)
            writer.write(b"GET /echo HTTP/1.1\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n")
            data = await asyncio.wait_for(reader.read(-1), 10)
            assert data.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in data
            reader, writer = await asyncio.open_connection("127.0.0.1", guard.port)
            start = time.monotonic()
            assert await asyncio.wait_for(reader.read(-1), 10) == b""  # idle: closed, nothing said
            assert LIMITS.idle_timeout_s <= time.monotonic() - start < LIMITS.idle_timeout_s + 1.5
            assert calls == []
        finally:
            await stop()

    _run(go())


def test_a_websocket_passes_through_both_ways():
    async def go():
        calls: list[str] = []
        guard, _, stop = await _stack(calls)
        try:
            async with websockets.connect(f"ws://127.0.0.1:{guard.port}/ws") as ws:
                for text in ("hello", "x" * 200_000):
                    await ws.send(text)
                    assert await asyncio.wait_for(ws.recv(), 10) == text.upper()
                await asyncio.sleep(LIMITS.header_timeout_s + 0.5)  # an upgraded connection is not timed
                await ws.send("still here")
                assert await asyncio.wait_for(ws.recv(), 10) == "STILL HERE"
        finally:
            await stop()

    _run(go())


def test_invalid_limits_are_refused_at_construction():
    for kwargs in ({"header_timeout_s": 0}, {"idle_timeout_s": -1}, {"max_header_bytes": 10}):
        with pytest.raises(ValueError):
            GuardLimits(**kwargs)
