"""The stored form of a stream's snapshot parts, and the rebuild plan read from them.

A stream's snapshot is a base (the store's snapshot slot) and, with incremental snapshots
(`snapshots.py`), deltas 1, 2, ... after it (its delta slots). Each part is the bytes of
`snapshot_codec.encode_chunks` (the part's mark, last_seq, "base": the mark of the base a delta
follows, None for a base, "index": its slot, 0 for a base, and the engine export).

Memory: each part is decoded from the store's blob (the disk store's is a mapping of the slot
file, in the page cache) into its own tensors, one copy: the plan holds the decoded parts (1x
their bytes), and importing them adds what the engine allocates for them.

Rebuilding (`plan_rebuild`): the base is used when it reads back, decodes and its mark is in the
log. Then the deltas are taken in order while each reads back, decodes, names this base and its
own slot, and has its mark in the log after the part before; the first that does not ends the
chain (a crash before it landed, a stale delta of an older base, damage: logged), and the records
after the last part taken are replayed. Nothing is lost by a bad delta: the log is compacted only
to a *base*'s mark, so every record after the base is still in it. Without a usable base a whole
log is replayed whole (logged), and a compacted log raises `SnapshotLostError`: the stream's start
is gone, and serving what is left would answer from a truncated stream, so the router
quarantines it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mosaic_ray.runtime.errors import SnapshotLostError
from mosaic_ray.runtime.durability.frame_log import FrameLog, LogRecord, MarkRecord, OpenRecord, SnapshotCorruptError
from mosaic_ray.runtime.durability.snapshot_codec import decode_part

log = logging.getLogger("mosaic_ray.runtime.actors.snapshots")


@dataclass(slots=True)
class RebuildPlan:
    """What a rebuild does: import `parts` (a base, then deltas; None: open an empty stream), then
    replay `records`."""

    parts: list[dict[str, Any]] | None
    last_seq: int  # the stream's seq once `parts` are imported (-1 without)
    records: list[LogRecord]
    mark: int | None  # the last part used
    whole: list[LogRecord] | None  # the whole log, when it is whole: the fallback if import fails
    problem: str = ""  # why a base (or a delta) present was not used
    # the base alone and the records after it: the fallback when the engine refuses the deltas
    base_only: tuple[int, int, list[LogRecord]] | None = field(default=None, repr=False)

    @property
    def state(self) -> dict[str, Any] | None:
        """The base's engine state (None without a snapshot)."""
        return self.parts[0] if self.parts else None

    @property
    def deltas(self) -> int:
        return len(self.parts) - 1 if self.parts else 0


def _mark_at(records: list[LogRecord], mark: int, start: int = 0) -> int | None:
    return next((i for i in range(len(records) - 1, start - 1, -1)
                 if isinstance(records[i], MarkRecord) and records[i].mark == mark), None)


def _read_part(got: tuple[int, Any], records, start: int, base: int | None, index: int):
    """(part, the index of its mark in `records`) or (None, why not)."""
    mark, blob = got
    at = _mark_at(records, mark, start)
    if at is None:
        return None, f"its mark {mark} is not in the log" + (" after the part before" if index else " (a stale snapshot)")
    try:
        part = decode_part(blob)
    except Exception as exc:  # unpickling errors have no common type
        return None, f"cannot decode it: {type(exc).__name__}: {exc}"
    if part.mark != mark:
        return None, f"it holds mark {part.mark}, stored as {mark}"
    if (part.base, part.index) != (base, index):
        return None, f"it is part {part.index} of base {part.base}, not part {index} of base {base}"
    return (part, at), ""


def _slot_after_gap(store: FrameLog, stream_id: str, index: int) -> bool:
    """Whether delta slot index + 1 holds something (usually empty: the chain just ends there)."""
    try:
        return store.get_delta(stream_id, index + 1) is not None
    except SnapshotCorruptError:
        return True


def plan_rebuild(store: FrameLog, stream_id: str) -> RebuildPlan:
    """Read the stream's snapshot parts and log (blocking: run it on a thread)."""
    records = list(store.read(stream_id))
    whole = records if not records or isinstance(records[0], OpenRecord) else None
    problem = ""
    try:
        got = store.get_snapshot(stream_id)
    except SnapshotCorruptError as exc:
        got, problem = None, str(exc)
    if got is not None:
        found, problem = _read_part(got, records, 0, None, 0)
        if found is not None:
            base, at = found
            chain, last, last_at = [base.state], base, at
            problem = ""
            index = 1
            while True:
                try:
                    got = store.get_delta(stream_id, index)
                except SnapshotCorruptError as exc:
                    problem = f"delta {index}: {exc}"
                    break
                if got is None:
                    if _slot_after_gap(store, stream_id, index):
                        problem = f"delta {index}: missing, and a later delta slot is not"
                    break
                found, why = _read_part(got, records, last_at + 1, base.mark, index)
                if found is None:
                    problem = f"delta {index}: {why}"
                    break
                part, last_at = found
                chain.append(part.state)
                last = part
                index += 1
            if problem:
                log.warning("stream %s: snapshot %s; replaying the log after part %d instead",
                            stream_id, problem, index - 1)
            return RebuildPlan(chain, last.last_seq, records[last_at + 1 :], last.mark, whole, problem,
                               base_only=(base.mark, base.last_seq, records[at + 1 :]))
    return without_snapshot(stream_id, whole, problem)


def base_only(stream_id: str, plan: RebuildPlan, why: str) -> RebuildPlan:
    """The plan without its deltas: the base and every record after it (the engine refused them)."""
    mark, last_seq, records = plan.base_only
    log.error("stream %s: snapshot deltas refused (%s); importing the base and replaying the log after it",
              stream_id, why)
    return RebuildPlan(plan.parts[:1], last_seq, records, mark, plan.whole, why)


def without_snapshot(stream_id: str, whole: list[LogRecord] | None, problem: str) -> RebuildPlan:
    """Full replay of a whole log; a compacted log without a usable snapshot is data loss."""
    if whole is None:
        log.error("stream %s: its log was compacted and its snapshot is unusable (%s): the records "
                  "before the snapshot are LOST; quarantining it", stream_id, problem or "no snapshot")
        raise SnapshotLostError(f"stream {stream_id!r}: log compacted and snapshot unusable "
                                f"({problem or 'no snapshot'}); its start is lost")
    if problem:
        log.error("stream %s: snapshot unusable (%s); replaying its whole log", stream_id, problem)
    return RebuildPlan(None, -1, whole, None, whole, problem)
