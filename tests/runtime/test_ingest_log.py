"""IngestQueue with a frame log, then a replay of that log into a fresh engine (no Ray): the log
records only what the engine accepted, a refused batch consumes no seq, and a duplicate of a
batch still queued is answered with the original's outcome (issue 20, items 1 and 4)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.durability.frame_codec import decode_all
from mosaic_ray.runtime.errors import SeqConflictError
from mosaic_ray.runtime.durability.frame_log import FrameRecord, LogWriteError, MemoryFrameLog, OpenRecord
from mosaic_ray.runtime.actors.ingest import IngestQueue
from mosaic_ray.runtime.durability.log_replay import replay
from mosaic_ray.runtime.durability.shard_log import frame_record
from mosaic_ray.runtime.actors.shard_metrics import ShardMeter
from mosaic_ray.runtime.actors.stream_slot import StreamSlot
from tests.runtime.fake_engine import FakeEngine

SID = "s"
MAX_REPLAY_FRAMES = 8


class LoggedIngest:
    """An IngestQueue over a FakeEngine whose batches are logged in a MemoryFrameLog."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.engine = FakeEngine()
        self.engine.open_stream(SID)
        self.store = MemoryFrameLog()
        self.store.append(SID, [OpenRecord(0.0)])
        self.fail_writes = False
        self._hold = hold  # set: the engine takes the frames; clear: they wait (a busy engine)
        self.queue = IngestQueue(self._append, ShardMeter(10.0, (0.1,)), 1000, 64, log=self._log)
        self.slot = StreamSlot(SID, 10.0)

    async def _append(self, sid, frames, stamps):
        if self._hold is not None:
            await self._hold.wait()
        return self.engine.append_frames(sid, frames, stamps)

    async def _log(self, sid, records):
        if self.fail_writes:
            raise LogWriteError("disk full")
        self.store.append(sid, records)

    def submit(self, seq, value: int, ts: float):
        return self.queue.submit(self.slot, seq, [np.full((8, 8, 3), value, np.uint8)], [ts])

    def rebuilt(self) -> tuple[FakeEngine, int]:
        """A fresh engine rebuilt from the log (the shard was killed): it and its last_seq."""
        engine = FakeEngine()
        engine.open_stream(SID)

        async def frames(pixels, stamps):
            return engine.append_frames(SID, pixels, stamps)

        async def text(t, ts):
            engine.append_text(SID, t, ts)

        async def decode(encoded):
            return decode_all(encoded)

        done = asyncio.run(replay(list(self.store.read(SID)), frames, text, decode, MAX_REPLAY_FRAMES))
        return engine, done.last_seq


def _frame_seqs(store: MemoryFrameLog) -> list[int]:
    return [r.seq for r in store.read(SID) if isinstance(r, FrameRecord)]


def test_a_refused_batch_consumes_no_seq_and_the_next_accepted_batch_survives_a_rebuild():
    """Frames at ts 5, 1, 6 without seq: 200, 422, 200. The refused one is not in the log, the
    accepted ones hold seqs 0 and 1, and a rebuild from the log has both frames and last_seq 1."""
    async def go():
        h = LoggedIngest()
        first = await h.submit(None, 50, 5.0)
        with pytest.raises(InvalidInputError):
            await h.submit(None, 10, 1.0)  # back in time: the engine refuses it
        third = await h.submit(None, 60, 6.0)
        return h, first, third

    h, first, third = asyncio.run(go())
    assert (first["seq"], third["seq"]) == (0, 1) and h.slot.last_seq == 1
    assert _frame_seqs(h.store) == [0, 1]  # only what was accepted
    engine, last_seq = h.rebuilt()
    assert engine.stream_info(SID)["frames"] == 2 and last_seq == 1
    assert engine.export_stream(SID)["tensors"]["timestamps"].tolist() == [5.0, 6.0]


def test_a_refused_batch_inside_a_coalesced_group_is_not_logged():
    async def go():
        hold = asyncio.Event()
        h = LoggedIngest(hold)
        acks = [asyncio.ensure_future(h.submit(None, v, t)) for v, t in [(1, 1.0), (2, 0.5), (3, 3.0)]]
        await asyncio.sleep(0.01)
        hold.set()
        return h, await asyncio.gather(*acks, return_exceptions=True)

    h, acks = asyncio.run(go())
    assert isinstance(acks[1], InvalidInputError)
    assert [acks[0]["seq"], acks[2]["seq"]] == [0, 1]
    assert _frame_seqs(h.store) == [0, 1]
    engine, last_seq = h.rebuilt()
    assert engine.stream_info(SID)["frames"] == 2 and last_seq == 1


def test_a_duplicate_of_a_queued_batch_that_is_then_refused_is_refused_too():
    """Item 4: seq 1 arrives twice while the engine is busy; the original is refused, so the
    duplicate must not be acknowledged (it answers the original's refusal)."""
    async def go():
        hold = asyncio.Event()
        h = LoggedIngest(hold)
        await asyncio.gather(h.submit(0, 50, 5.0), asyncio.sleep(0.01), _set(hold))
        hold.clear()
        original = asyncio.ensure_future(h.submit(1, 10, 1.0))  # refused once the engine sees it
        duplicate = asyncio.ensure_future(h.submit(1, 10, 1.0))
        await asyncio.sleep(0.01)
        assert not duplicate.done()  # not acknowledged before the original's outcome is known
        hold.set()
        return h, await asyncio.gather(original, duplicate, return_exceptions=True)

    h, (original, duplicate) = asyncio.run(go())
    assert isinstance(original, InvalidInputError) and isinstance(duplicate, InvalidInputError)
    assert h.slot.last_seq == 0 and _frame_seqs(h.store) == [0]


def test_a_duplicate_of_a_queued_batch_that_is_stored_is_acknowledged_as_a_duplicate():
    async def go():
        hold = asyncio.Event()
        h = LoggedIngest(hold)
        original = asyncio.ensure_future(h.submit(4, 10, 1.0))
        duplicate = asyncio.ensure_future(h.submit(4, 10, 1.0))
        await asyncio.sleep(0.01)
        assert not duplicate.done()
        hold.set()
        return h, await original, await duplicate

    h, original, duplicate = asyncio.run(go())
    assert not original["duplicate"] and original["frames_added"] == 1
    assert duplicate["duplicate"] and duplicate["frames_added"] == 0
    assert _frame_seqs(h.store) == [4] and h.engine.stream_info(SID)["frames"] == 1


def test_a_batch_the_log_could_not_store_is_not_acknowledged_until_a_retry_stores_it():
    """The engine took the frames but the log refused the write (disk full): 503, the record is
    kept, and a retry of the same seq stores it and is answered as a duplicate only then."""
    async def go():
        h = LoggedIngest()
        h.fail_writes = True
        with pytest.raises(LogWriteError):
            await h.submit(0, 10, 1.0)
        with pytest.raises(LogWriteError):
            await h.submit(0, 10, 1.0)  # still not durable: not acknowledged
        h.fail_writes = False
        retry = await h.submit(0, 10, 1.0)
        after = await h.submit(None, 20, 2.0)
        return h, retry, after

    h, retry, after = asyncio.run(go())
    assert retry["duplicate"] and after["seq"] == 1
    assert _frame_seqs(h.store) == [0, 1] and h.engine.stream_info(SID)["frames"] == 2
    engine, last_seq = h.rebuilt()
    assert engine.stream_info(SID)["frames"] == 2 and last_seq == 1


def test_replay_of_a_log_written_before_the_fix_keeps_the_accepted_batch_that_reused_a_seq():
    """Logs written by earlier versions hold refused batches, and the accepted batch after one
    reuses its seq: replay skips the refused one and applies the accepted one."""
    h = LoggedIngest()
    h.store.append(SID, [frame_record(0, [np.full((8, 8, 3), 50, np.uint8)], [5.0]),
                         frame_record(1, [np.full((8, 8, 3), 10, np.uint8)], [1.0]),  # refused when it arrived
                         frame_record(1, [np.full((8, 8, 3), 60, np.uint8)], [6.0])])
    engine, last_seq = h.rebuilt()
    assert engine.stream_info(SID)["frames"] == 2 and last_seq == 1


async def _set(event: asyncio.Event) -> None:
    event.set()


def test_a_resend_of_the_last_seq_behind_a_new_batch_is_a_duplicate_not_a_conflict():
    """Seq 0 is stored; then, at once, a batch without seq (it takes 1) and a resend of 0 and of
    1: both resends are duplicates, answered once their originals are durable."""
    async def go():
        hold = asyncio.Event()
        hold.set()
        h = LoggedIngest(hold)
        await h.submit(0, 10, 1.0)
        hold.clear()
        new = asyncio.ensure_future(h.submit(None, 20, 2.0))
        old = asyncio.ensure_future(h.submit(0, 10, 1.0))
        again = asyncio.ensure_future(h.submit(1, 20, 2.0))
        await asyncio.sleep(0.01)
        hold.set()
        return h, await new, await old, await again

    h, new, old, again = asyncio.run(go())
    assert new["seq"] == 1 and not new["duplicate"]
    assert old["duplicate"] and again["duplicate"] and again["seq"] == 1
    assert _frame_seqs(h.store) == [0, 1] and h.engine.stream_info(SID)["frames"] == 2


def test_a_resend_naming_the_seq_a_batch_without_seq_lost_is_not_acknowledged():
    """One coalesced group: a batch the engine refuses (a frame too small), one without seq
    (tentatively seq 1, finally 0, once the first is refused), and one naming seq 1 while it was
    on its way. Seq 1 was never taken: the third is not acknowledged as a duplicate."""
    async def go():
        hold = asyncio.Event()
        h = LoggedIngest(hold)
        tiny = h.queue.submit(h.slot, None, [np.zeros((2, 2, 3), np.uint8)], [0.0])
        acks = [asyncio.ensure_future(c) for c in (tiny, h.submit(None, 20, 1.0), h.submit(1, 20, 1.0))]
        await asyncio.sleep(0.01)
        hold.set()
        return h, await asyncio.gather(*acks, return_exceptions=True)

    h, (refused, taken, named) = asyncio.run(go())
    assert isinstance(refused, InvalidInputError) and taken["seq"] == 0
    assert isinstance(named, SeqConflictError), named
    assert _frame_seqs(h.store) == [0] and h.slot.last_seq == 0
