"""Rebuilding a stream in an engine from its frame log.

`replay` applies a log's records in order, with the rules ingest applied when they arrived, so
the engine ends up holding what it held when the records were acknowledged:

- a frame record whose seq is not above the last one the engine took is a duplicate: skipped (as
  ingest acknowledged it without appending);
- a record the engine refuses with an `EngineError` is skipped. Ingest logs only what the engine
  accepted (`log_order.py`), but logs written before that held refused batches too, and the
  accepted batch after one reused its seq: judged against the last seq taken, not the refused
  one's, it is applied (a refused call leaves the stream unchanged: the `Engine` invariant);
- a record that fails `check` (`record_check.py`: outside the service's bounds), or on which the
  engine fails while staying healthy (`RequestFailedError`), ends the replay with
  `StreamQuarantinedError`: the stream cannot be rebuilt as acknowledged, and handing the record
  to another engine would fail there too; the caller quarantines the stream alone;
- `EngineFailedError` (the shard's mark of a broken engine) ends the replay: the engine is broken,
  and the caller gives up on the stream;
- `OverloadedError` (capacity: the engine's host or device pool is full) ends the replay too, as
  a failure to try again later or on another engine: never a skipped record (that would drop an
  acknowledged frame) nor a quarantine (the log is fine).

Speed: consecutive frame records are applied in groups of up to `max_frames` frames (one engine
call each; the engine's step loop ingests the groups of streams replayed at once in one
forward), and the next group is decoded while the engine works on the current one. A group the
engine refuses is applied again record by record, to skip only the refused ones.

Records other than frames, text and options (`OpenRecord`, a snapshot's `MarkRecord`) are skipped.

Not replayed: questions. The engine's context includes earlier questions and answers (interface
contract); a rebuilt stream holds the frames and text but not its Q/A history (except the turns
before its snapshot, if it was rebuilt from one: they are in the engine state it imported).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import numpy as np

from mosaic_ray.engine.interface import EngineError, OverloadedError
from mosaic_ray.runtime.errors import EngineFailedError, RequestFailedError, StreamQuarantinedError
from mosaic_ray.runtime.durability.frame_codec import EncodedFrame
from mosaic_ray.runtime.durability.frame_log import FrameRecord, LogRecord, OptionsRecord, TextRecord
from mosaic_ray.runtime.durability.record_check import check_record

AppendFrames = Callable[[list[np.ndarray], list[float]], Awaitable[int]]
AppendText = Callable[[str, float], Awaitable[None]]
Configure = Callable[[dict], Awaitable[object]]
Decode = Callable[[list[EncodedFrame]], Awaitable[list[np.ndarray]]]
Check = Callable[[LogRecord], None]  # raises InvalidInputError for a record no engine may get


@dataclass(slots=True)
class ReplayResult:
    last_seq: int = -1
    frames: int = 0  # frames the engine took
    batches: int = 0  # frame records applied
    texts: int = 0
    options: int = 0
    skipped: int = 0  # records refused again, or duplicates
    engine_calls: int = 0


async def replay(
    records: Iterable[LogRecord], append_frames: AppendFrames, append_text: AppendText, decode: Decode,
    max_frames: int, configure: Configure | None = None, last_seq: int = -1, check: Check = check_record,
) -> ReplayResult:
    """Apply `records` in order; `last_seq` is the stream's seq before them (a snapshot's)."""
    out = ReplayResult(last_seq=last_seq)
    groups = _groups(_checked(records, check), max_frames)
    pending = _next_decoded(groups, decode)
    try:
        while True:
            item = await pending
            if item is None:
                return out
            pending = _next_decoded(groups, decode)  # decode ahead while the engine works
            group, pixels = item
            if isinstance(group, TextRecord):
                await _apply_text(group, append_text, out)
            elif isinstance(group, OptionsRecord):
                await _apply_options(group, configure, out)
            else:
                await _apply_frames(group, pixels, append_frames, out)
    finally:
        if not pending.done():  # a replay that ended early: the decode ahead is not wanted
            pending.cancel()
        elif not pending.cancelled():
            pending.exception()  # retrieved: a quarantine found ahead is not reported twice


def _checked(records: Iterable[LogRecord], check: Check):
    for i, rec in enumerate(records):
        try:
            check(rec)
        except EngineError as exc:
            raise StreamQuarantinedError(f"log record {i} fails validation: {exc}") from None
        yield rec


def _poison(rec: LogRecord) -> StreamQuarantinedError:
    what = f"frame batch seq {rec.seq}" if isinstance(rec, FrameRecord) else type(rec).__name__
    return StreamQuarantinedError(f"the engine fails on a log record ({what}) while it stays healthy")


def _groups(records: Iterable[LogRecord], max_frames: int):
    """Text and options records alone, frame records in runs of at most `max_frames` frames."""
    run: list[FrameRecord] = []
    count = 0
    for rec in records:
        if isinstance(rec, FrameRecord):
            if run and count + len(rec.frames) > max_frames:
                yield run
                run, count = [], 0
            run.append(rec)
            count += len(rec.frames)
        elif isinstance(rec, (TextRecord, OptionsRecord)):
            if run:
                yield run
                run, count = [], 0
            yield rec
    if run:
        yield run


def _next_decoded(groups, decode: Decode) -> asyncio.Future:
    async def take():
        group = next(groups, None)
        if group is None or isinstance(group, (TextRecord, OptionsRecord)):
            return None if group is None else (group, None)
        try:
            return group, await decode([f for rec in group for f in rec.frames])
        except Exception as exc:  # decoded again record by record, to find the bad one
            return group, exc

    return asyncio.ensure_future(take())


async def _apply_text(rec: TextRecord, append_text: AppendText, out: ReplayResult) -> None:
    await _apply_record(rec, lambda: append_text(rec.text, rec.timestamp), out, "texts")


async def _apply_options(rec: OptionsRecord, configure: Configure | None, out: ReplayResult) -> None:
    if configure is None:
        out.skipped += 1
        return
    await _apply_record(rec, lambda: configure(rec.options), out, "options")


async def _apply_record(rec: LogRecord, call, out: ReplayResult, landed: str | Callable[[], None]) -> None:
    """One engine call for one record: when it lands, `landed` (a counter of `out` to add one to,
    or a callable) is applied; a broken engine or one out of room ends the replay; a request
    failure makes the record poison; another refusal skips it (it was refused live too)."""
    try:
        out.engine_calls += 1
        await call()
        if callable(landed):
            landed()
        else:
            setattr(out, landed, getattr(out, landed) + 1)
    except (EngineFailedError, OverloadedError):
        raise
    except RequestFailedError:
        raise _poison(rec) from None
    except EngineError:
        out.skipped += 1


async def _apply_frames(group: list[FrameRecord], pixels, append_frames: AppendFrames, out: ReplayResult) -> None:
    """The group in one engine call when every record is fresh; otherwise record by record, each
    judged against the seq the engine last took (not the seq of a record it may refuse)."""
    fresh = _fresh(group, out.last_seq)
    if len(fresh) == len(group) and not isinstance(pixels, BaseException):
        try:
            out.engine_calls += 1
            await append_frames(pixels, [t for rec in fresh for t in rec.timestamps])
            _took(out, fresh)
            return
        except (EngineFailedError, OverloadedError):
            raise
        except EngineError:
            pass  # one of them is refused or poison: find it below
    for rec in group:
        if rec.seq <= out.last_seq:  # a duplicate
            out.skipped += 1
            continue
        async def one(rec=rec):
            await append_frames(await asyncio.to_thread(_decode_each, rec.frames), list(rec.timestamps))

        await _apply_record(rec, one, out, lambda rec=rec: _took(out, [rec]))


def _fresh(group: list[FrameRecord], last_seq: int) -> list[FrameRecord]:
    """The records whose seqs rise above `last_seq` in order (the others would be duplicates)."""
    fresh = []
    for rec in group:
        if rec.seq > last_seq:
            fresh.append(rec)
            last_seq = rec.seq
    return fresh


def _decode_each(frames) -> list[np.ndarray]:
    from mosaic_ray.runtime.durability.frame_codec import decode

    try:
        return [decode(f) for f in frames]
    except ValueError as exc:  # a raw frame whose bytes do not fit its shape: refused at ingest too
        from mosaic_ray.runtime.errors import MalformedFrameError

        raise MalformedFrameError(str(exc)) from None


def _took(out: ReplayResult, recs: list[FrameRecord]) -> None:
    out.last_seq = recs[-1].seq
    out.batches += len(recs)
    out.frames += sum(len(r.frames) for r in recs)
