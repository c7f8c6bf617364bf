"""The client against the running Serve app: a real video ingested through HTTP into several
streams at once, answers plain and streamed, and an async client opening many streams."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mosaic_ray.client import AsyncMosaicClient, MosaicClient
from mosaic_ray.video import default_video, read_frames

pytestmark = pytest.mark.ray

FPS, SIZE, MAX_FRAMES = 5.0, 64, 20


def test_a_real_video_reaches_every_stream_through_http(serve_url):
    video = default_video()
    expected = len(list(read_frames(video, fps=FPS, size=SIZE, max_frames=MAX_FRAMES)))
    with MosaicClient(serve_url) as c:
        ids = [c.create_stream() for _ in range(2)]
        results = c.push_videos({sid: video for sid in ids}, fps=FPS, size=SIZE, max_frames=MAX_FRAMES,
                                batch_frames=6, progress=False)
        infos = [c.stream_info(sid) for sid in ids]
        answer = c.ask(ids[0], "What happens?", max_tokens=48)
        streamed = "".join(c.ask_stream(ids[1], "What happens?", max_tokens=48))
        for sid in ids:
            c.delete_stream(sid)
    assert [r.frames for r in results.values()] == [expected, expected]
    assert [i["frames"] for i in infos] == [expected, expected]
    assert [i["last_seq"] for i in infos] == [r.last_seq for r in results.values()]
    assert answer == streamed and answer.startswith(f"I saw {expected} frames")


def test_an_async_client_feeds_many_streams_at_once(serve_url):
    n_streams, batches = 8, 3

    async def feed(c: AsyncMosaicClient, sid: str) -> dict:
        for b in range(batches):
            frames = [np.full((32, 32, 3), 10 * b + i, np.uint8) for i in range(4)]
            await c.push_frames(sid, frames, [float(4 * b + i) for i in range(4)])
        return await c.stream_info(sid)

    async def go():
        async with AsyncMosaicClient(serve_url) as c:
            ids = await asyncio.gather(*(c.create_stream() for _ in range(n_streams)))
            infos = await asyncio.gather(*(feed(c, sid) for sid in ids))
            deltas = [d async for d in c.ask_stream(ids[0], "How many frames?")]
            await asyncio.gather(*(c.delete_stream(sid) for sid in ids))
            return infos, deltas

    infos, deltas = asyncio.run(go())
    assert all(i["frames"] == 4 * batches and i["last_seq"] == batches - 1 for i in infos)
    assert {i["shard"] for i in infos} == {"httptest:shard:0", "httptest:shard:1"}
    assert "".join(deltas).startswith(f"I saw {4 * batches} frames")
