"""The checks a logged record passes before replay hands it to an engine (`log_replay.py`).

Why: a log may hold a record that no longer passes the service's bounds (written before a bound
existed, e.g. a frame at ts=1e300 that breaks the real engine's clock arithmetic, or by hand).
Handing it to an engine on replay could take down the shard that rebuilds the stream, with every
other stream it holds; refusing it here quarantines that one stream instead.

Swap point: the serve layer's one request validator (issue 20: one validation layer shared by
HTTP, WebSocket, OpenAI chat and replay) is the source of truth for these bounds; once it lands,
`check_record` calls it and `MAX_STREAM_TIME_S` goes. Until then the bounds here are the ones
the engine needs: finite times within `MAX_STREAM_TIME_S`, as many timestamps as frames.
"""

from __future__ import annotations

import math
import numbers

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.frame_log import FrameRecord, LogRecord, TextRecord

# The largest stream-clock time (seconds) a record may carry: ~31.7 years of video, far past any
# stream, and small enough that a float64 time keeps sub-microsecond steps (1e9 s < 2**30 s:
# 2**-23 s apart at most).
MAX_STREAM_TIME_S = 1e9


def check_times(timestamps) -> None:
    """Raise `InvalidInputError` unless every time is finite and within [0, MAX_STREAM_TIME_S]:
    the shard checks live appends too, so no caller (HTTP, WebSocket, Ray) hands the engine a time
    it cannot use (a frame at ts=1e300 left the real engine's stream clock unusable)."""
    for ts in timestamps:
        _check_time(ts)


def check_record(record: LogRecord) -> None:
    """Raise `InvalidInputError` when `record` may not reach an engine."""
    if isinstance(record, FrameRecord):
        if len(record.frames) != len(record.timestamps):
            raise InvalidInputError(f"{len(record.frames)} frames but {len(record.timestamps)} timestamps")
        check_times(record.timestamps)
    elif isinstance(record, TextRecord):
        _check_time(record.timestamp)
        if not isinstance(record.text, str) or "\x00" in record.text:
            raise InvalidInputError("text must be a string without NUL characters")


def _check_time(ts: float) -> None:
    if not isinstance(ts, numbers.Real) or isinstance(ts, bool):  # numpy floats are Real too
        raise InvalidInputError(f"timestamp {ts!r} is not a number")
    if not (math.isfinite(ts) and 0.0 <= ts <= MAX_STREAM_TIME_S):
        raise InvalidInputError(f"timestamp {ts!r} outside [0, {MAX_STREAM_TIME_S:g}] s")
