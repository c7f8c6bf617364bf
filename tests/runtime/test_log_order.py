"""LogOrder: records reach the log in reservation order, only for filled entries; a failed
write keeps its records first in line; a mark records the seq of the last frame record before it."""

from __future__ import annotations

import asyncio

import pytest

from mosaic_ray.runtime.durability.frame_log import FrameRecord, LogWriteError, MarkRecord, TextRecord
from mosaic_ray.runtime.durability.log_order import LogOrder


def _frames(seq: int) -> FrameRecord:
    return FrameRecord(seq, (), ())


class Log:
    def __init__(self) -> None:
        self.records: list = []
        self.fail = False

    async def write(self, records) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise LogWriteError("disk full")
        self.records.extend(records)


def test_records_are_written_in_reservation_order_whatever_order_they_are_filled_in():
    async def go():
        log, order = Log(), LogOrder()
        a, b, c = order.reserve(), order.reserve(), order.reserve()
        order.fill(c, [TextRecord("c", 0.0)])
        waiting = asyncio.ensure_future(order.durable(c, log.write))
        await asyncio.sleep(0.01)
        assert not waiting.done() and log.records == []  # a and b are not settled yet
        order.fill(b, [_frames(1)])
        order.drop(a)  # refused: nothing of it is written
        await waiting
        return log, order

    log, order = asyncio.run(go())
    assert log.records == [_frames(1), TextRecord("c", 0.0)] and order.pending == 0 and order.logged_seq == 1


def test_a_failed_write_keeps_its_records_first_in_line():
    async def go():
        log, order = Log(), LogOrder()
        first = order.reserve()
        order.fill(first, [_frames(0)])
        log.fail = True
        with pytest.raises(LogWriteError):
            await order.durable(first, log.write)
        assert order.unwritten(0) is first
        second = order.reserve()
        order.fill(second, [_frames(1)])
        log.fail = False
        await order.durable(second, log.write)
        return log, order, first

    log, order, first = asyncio.run(go())
    assert log.records == [_frames(0), _frames(1)] and first.written and order.unwritten(0) is None


def test_a_mark_records_the_seq_of_the_last_frame_record_written_before_it():
    async def go():
        log, order = Log(), LogOrder(logged_seq=4)
        frames, mark, refused = order.reserve(), order.reserve(), order.reserve()
        order.fill_mark(mark, lambda seq: MarkRecord(7, seq))
        order.fill(frames, [_frames(5)])
        order.drop(refused)
        await order.flush(log.write)
        return log

    assert asyncio.run(go()).records == [_frames(5), MarkRecord(7, 5)]


def test_exclusive_runs_apart_from_writes():
    async def go():
        log, order, seen = Log(), LogOrder(), []

        async def compact():
            seen.append(len(log.records))
            await asyncio.sleep(0.01)
            seen.append(len(log.records))

        entry = order.reserve()
        order.fill(entry, [_frames(0)])
        await asyncio.gather(order.exclusive(compact), order.durable(entry, log.write))
        return seen

    assert asyncio.run(go()) == [0, 0]  # no write landed while it ran
