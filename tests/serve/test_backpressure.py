"""Backpressure over HTTP with a slow engine and small bounds: flooding one stream, then one shard,
gets 503 + Retry-After past the bounds, the shard's queue never exceeds its bound, it drains to 0
afterwards, and every acknowledged frame is in its stream (none lost, none added twice)."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests.runtime.fake_engine import fake_app_config
from tests.serve.serve_apps import MSGPACK, extra_app, frames_body

pytestmark = pytest.mark.ray

FRAME_DELAY_S = 0.03  # engine time per frame: the queue builds up behind it
SHARD_FRAMES, STREAM_FRAMES, STREAM_REQUESTS = 12, 6, 10
CONFIG = fake_app_config("bptest", num_shards=1, frame_delay_s=FRAME_DELAY_S)
CONFIG["runtime"]["shard"].update(max_pending_frames=SHARD_FRAMES, max_stream_pending_frames=STREAM_FRAMES,
                                  max_stream_requests=STREAM_REQUESTS, max_coalesce_frames=2)
PENDING_RE = re.compile(r"^mosaic_pending_frames\{[^}]*\} (\S+)$", re.M)


@pytest.fixture(scope="module")
def base(serve_url):
    with extra_app(serve_url, "bptest", CONFIG) as url:
        yield url


async def _flood(base: str, streams: list[str], per_stream: int) -> tuple[dict[str, list[httpx.Response]], int]:
    """`per_stream` one-frame batches on each stream at once (no seq: the shard numbers them), while
    /metrics is polled; returns the responses per stream and the largest shard queue seen."""
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=200)) as c:
        done = asyncio.Event()
        seen = [0]

        async def watch() -> None:
            while not done.is_set():
                text = (await c.get("/metrics")).text
                seen[0] = max([seen[0], *(int(float(v)) for v in PENDING_RE.findall(text))])
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        calls = [(sid, c.post(f"/v1/streams/{sid}/frames", content=frames_body(None, ts0=1.0), headers=MSGPACK))
                 for sid in streams for _ in range(per_stream)]
        responses = await asyncio.gather(*(call for _, call in calls))
        done.set()
        await watcher
        by_stream: dict[str, list[httpx.Response]] = {sid: [] for sid in streams}
        for (sid, _), r in zip(calls, responses):
            by_stream[sid].append(r)
        pending = [int(float(v)) for v in PENDING_RE.findall((await c.get("/metrics")).text)]
        return by_stream, max([seen[0], *pending]) if pending else seen[0]


def _check(base: str, by_stream: dict[str, list[httpx.Response]]) -> tuple[int, list[str]]:
    """Every answer is 200 or 503 + Retry-After; acked frames == frames held; returns (503s, messages)."""
    refused, messages = 0, []
    with httpx.Client(base_url=base, timeout=30) as c:
        for sid, rs in by_stream.items():
            acked = [r.json() for r in rs if r.status_code == 200]
            for r in rs:
                assert r.status_code in (200, 503), r.text
                if r.status_code == 503:
                    refused += 1
                    assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
                    messages.append(r.json()["error"]["message"])
            info = c.get(f"/v1/streams/{sid}").json()
            assert info["frames"] == sum(a["frames_added"] for a in acked) == len(acked)
            assert sorted(a["seq"] for a in acked) == list(range(len(acked)))  # each once, in order
    return refused, messages


def test_flooding_one_stream_is_refused_past_its_bounds(base):
    with httpx.Client(base_url=base, timeout=30) as c:
        c.post("/v1/streams", json={"id": "flood-one"})
    by_stream, most = asyncio.run(_flood(base, ["flood-one"], 40))
    refused, messages = _check(base, by_stream)
    print(f"\none stream: 40 batches, {40 - refused} acked, {refused} x 503, shard queue <= {most}")
    assert refused > 0 and most <= SHARD_FRAMES
    assert any("requests in progress" in m or "stream 'flood-one' ingest queue" in m for m in messages)
    with httpx.Client(base_url=base, timeout=30) as c:
        # after the flood the stream takes frames again, and the shard's queue is empty
        assert c.post("/v1/streams/flood-one/frames", content=frames_body(None, ts0=2.0), headers=MSGPACK).status_code == 200
        assert [int(float(v)) for v in PENDING_RE.findall(c.get("/metrics").text)] == [0]
        c.delete("/v1/streams/flood-one")


def test_flooding_one_shard_is_refused_past_its_bound(base):
    streams = [f"flood-{i}" for i in range(6)]
    with httpx.Client(base_url=base, timeout=30) as c:
        for sid in streams:
            c.post("/v1/streams", json={"id": sid})
    by_stream, most = asyncio.run(_flood(base, streams, 5))  # 30 frames at once, under each stream's bounds
    refused, messages = _check(base, by_stream)
    print(f"\none shard: 30 batches, {30 - refused} acked, {refused} x 503, shard queue <= {most}")
    assert refused > 0 and most <= SHARD_FRAMES
    assert any("shard ingest queue is full" in m for m in messages)
    with httpx.Client(base_url=base, timeout=30) as c:
        assert [int(float(v)) for v in PENDING_RE.findall(c.get("/metrics").text)] == [0]
        for sid in streams:
            c.delete(f"/v1/streams/{sid}")
