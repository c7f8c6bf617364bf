"""Client behaviour against a scripted server (httpx.MockTransport, no Ray): backpressure, retries
that never duplicate a frame, and questions that are never sent twice."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgpack
import numpy as np
import pytest
from tenacity import RetryCallState

from mosaic_ray.client import AsyncMosaicClient, MosaicAPIError, MosaicClient, RetryPolicy

FAST = RetryPolicy(max_attempts=5, backoff_s=0.001, max_backoff_s=0.01)
FRAMES = [np.full((16, 16, 3), 9, np.uint8)] * 2


class ScriptedServer:
    """Keeps frames per stream with seq dedup, like the real server; `script` lists what to do
    with the next frame requests: "ok", "busy" (503 + Retry-After: 0), or "lost" (apply the
    batch, then drop the connection before answering)."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.frames: dict[str, int] = {}
        self.last_seq: dict[str, int] = {}
        self.seen_seqs: list[int] = []
        self.queries = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/frames"):
            sid = path.split("/")[3]
            batch = msgpack.unpackb(request.content, raw=False)
            self.seen_seqs.append(batch["seq"])
            action = self.script.pop(0) if self.script else "ok"
            if action == "busy":
                return httpx.Response(503, headers={"Retry-After": "0"},
                                      json={"error": {"code": "overloaded", "message": "busy"}})
            dup = batch["seq"] <= self.last_seq.get(sid, -1)
            if not dup:
                self.frames[sid] = self.frames.get(sid, 0) + len(batch["frames"])
                self.last_seq[sid] = batch["seq"]
            if action == "lost":
                raise httpx.ReadError("connection reset", request=request)
            return httpx.Response(200, json={"stream_id": sid, "seq": batch["seq"], "duplicate": dup,
                                             "frames_added": 0 if dup else len(batch["frames"])})
        if path.endswith("/query"):
            self.queries += 1
            raise httpx.ReadError("connection reset", request=request)
        if request.method == "GET" and path.startswith("/v1/streams/"):
            sid = path.split("/")[3]
            return httpx.Response(200, json={"id": sid, "shard": "x", "last_seq": self.last_seq.get(sid, -1)})
        if path == "/v1/streams":
            return httpx.Response(201, json={"id": json.loads(request.content)["id"], "shard": "x"})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})


def _client(server: ScriptedServer) -> AsyncMosaicClient:
    return AsyncMosaicClient("http://test", retry=FAST, transport=httpx.MockTransport(server))


def test_busy_server_is_retried_with_the_same_seq():
    server = ScriptedServer(["busy", "busy", "ok"])

    async def go():
        async with _client(server) as c:
            return await c.push_frames("s", FRAMES, [0.0, 1.0]), c.retries

    ack, retries = asyncio.run(go())
    assert ack["seq"] == 0 and retries == 2 and server.seen_seqs == [0, 0, 0]
    assert server.frames == {"s": 2}


def test_a_lost_reply_is_retried_and_the_frames_land_once():
    server = ScriptedServer(["ok", "lost", "ok"])

    async def go():
        async with _client(server) as c:
            await c.push_frames("s", FRAMES, [0.0, 1.0])
            second = await c.push_frames("s", FRAMES, [2.0, 3.0])
            third = await c.push_frames("s", FRAMES, [4.0, 5.0])
            return second, third

    second, third = asyncio.run(go())
    assert server.seen_seqs == [0, 1, 1, 2]
    assert second["duplicate"] and third["seq"] == 2
    assert server.frames == {"s": 6}


def test_seq_continues_from_the_server_after_a_client_restart():
    server = ScriptedServer([])
    server.last_seq["s"] = 41

    async def go():
        async with _client(server) as c:
            return await c.push_frames("s", FRAMES, [0.0, 1.0])

    assert asyncio.run(go())["seq"] == 42


def test_a_question_is_never_sent_twice_and_errors_are_typed():
    server = ScriptedServer([])

    async def go():
        async with _client(server) as c:
            with pytest.raises(httpx.ReadError):
                await c.ask("s", "what?")
            with pytest.raises(MosaicAPIError) as missing:
                await c._request("GET", "/nowhere", idempotent=True)
            return missing.value

    missing = asyncio.run(go())
    assert server.queries == 1
    assert missing.status == 404 and missing.code == "not_found"


def test_the_blocking_client_wraps_the_async_one():
    server = ScriptedServer(["busy"])
    with MosaicClient("http://test", retry=FAST, transport=httpx.MockTransport(server)) as c:
        sid = c.create_stream()
        assert c.push_frames(sid, FRAMES, [0.0, 1.0])["seq"] == 0
    assert server.frames == {sid: 2}


def test_a_streamed_question_is_retried_only_while_refused():
    """503 before the stream opens is retried (the question never ran); the events then flow once."""
    calls = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("accept"))
        if len(calls) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"code": "busy", "message": "b"}})
        body = 'data: {"delta":"A red"}\n\ndata: {"delta":" car"}\n\nevent: done\ndata: {"deltas":2}\n\n'
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body)

    async def go():
        async with AsyncMosaicClient("http://test", retry=FAST, transport=httpx.MockTransport(server)) as c:
            return [d async for d in c.ask_stream("s", "what?")], c.retries

    deltas, retries = asyncio.run(go())
    assert deltas == ["A red", " car"] and retries == 1 and calls == ["text/event-stream"] * 2


def test_the_wait_is_the_servers_retry_after_capped_else_exponential_backoff():
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=3.0, max_retry_after_s=10.0)
    wait = policy.retrying(idempotent=True).wait

    def after(attempt: int, outcome) -> float:
        state = RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        if isinstance(outcome, Exception):
            state.set_exception((type(outcome), outcome, None))
        else:
            state.set_result(outcome)
        return wait(state)

    assert after(1, httpx.Response(503, headers={"Retry-After": "2"})) == 2.0
    assert after(1, httpx.Response(503, headers={"Retry-After": "600"})) == 10.0
    assert after(1, httpx.Response(503, headers={"Retry-After": "-1"})) == 0.0
    date = "Wed, 21 Oct 2015 07:28:00 GMT"  # an HTTP date is not read: backoff instead
    assert [after(n, httpx.Response(503, headers={"Retry-After": date})) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert [after(n, httpx.ConnectError("refused")) for n in (1, 4, 9)] == [0.5, 3.0, 3.0]
