"""Per-stream bounds without Ray: one stream's ingest queue (`max_stream_pending_frames`) and the
requests a stream has admitted or held (`StreamSlot.requests`, bounded by the shard)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mosaic_ray.runtime.errors import ShardBusyError
from mosaic_ray.runtime.actors.stream_slot import StreamSlot
from tests.runtime.test_ingest import Harness

STREAM_BOUND = 3


def _frames(values):
    return [np.full((8, 8, 3), v, np.uint8) for v in values]


def test_one_stream_cannot_fill_the_shard_queue_and_others_still_get_in():
    async def go():
        h = Harness(max_pending=100, delay=0.05)
        h.queue.max_stream_pending_frames = STREAM_BOUND
        h.engine.open_stream("t")
        other = StreamSlot("t", 10.0)
        first = asyncio.ensure_future(h.submit(0, [0], [0.0]))  # taken by the engine at once
        await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(h.submit(i, [i], [float(i)])) for i in range(1, 1 + STREAM_BOUND)]
        await asyncio.sleep(0)
        with pytest.raises(ShardBusyError) as busy:
            await h.submit(9, [9], [9.0])
        other_ack = await h.queue.submit(other, 0, _frames([5]), [0.0])  # another stream is not held back
        acks = [await first, *[await q for q in queued]]
        big = await h.submit(10, list(range(10)), [10.0] * 10)  # larger than the bound, from an empty queue
        return h, busy.value, other_ack, acks, big

    h, busy, other_ack, acks, big = asyncio.run(go())
    assert busy.status == 503 and "stream 's'" in str(busy) and busy.retry_after_s >= 1
    assert other_ack["frames_added"] == 1
    assert [a["seq"] for a in acks] == [0, 1, 2, 3] and big["frames_added"] == 10
    assert h.engine.stream_info("s")["frames"] == 14 and h.queue.pending_frames == 0


def test_requests_count_held_ones_while_frozen():
    async def go():
        slot = StreamSlot("s", 10.0)

        async def request():
            async with slot.admit(5.0):
                await asyncio.sleep(0.05)

        await slot.freeze()
        held = [asyncio.ensure_future(request()) for _ in range(4)]
        await asyncio.sleep(0.01)
        during = slot.requests
        slot.thaw()
        await asyncio.gather(*held)
        return during, slot.requests

    during, after = asyncio.run(go())
    assert during == 4 and after == 0
