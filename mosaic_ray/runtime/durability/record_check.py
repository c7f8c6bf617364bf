"""The checks a logged record passes before replay hands it to an engine (`log_replay.py`).

Why: a log may hold a record that no longer passes the service's bounds (written before a bound
existed, e.g. a frame at ts=1e300 that breaks the real engine's clock arithmetic, or by hand).
Handing it to an engine on replay could take down the shard that rebuilds the stream, with every
other stream it holds; refusing it here quarantines that one stream instead.

The bounds are the service's one validation layer (`mosaic_ray/bounds.py`, shared with HTTP,
the WebSocket and OpenAI chat): finite times within `bounds.MAX_TIME_S`, a seq in 63 bits, text
without control characters; here also as many timestamps as frames.
"""

from __future__ import annotations

import numbers

from mosaic_ray import bounds
from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.durability.frame_log import FrameRecord, LogRecord, TextRecord


def check_times(timestamps) -> None:
    """Raise `InvalidInputError` unless every time is finite and within [0, bounds.MAX_TIME_S]:
    the shard checks live appends too, so no caller (HTTP, WebSocket, Ray) hands the engine a time
    it cannot use (a frame at ts=1e300 left the real engine's stream clock unusable)."""
    for ts in timestamps:
        _check_time(ts)


def check_record(record: LogRecord) -> None:
    """Raise `InvalidInputError` when `record` may not reach an engine."""
    try:
        if isinstance(record, FrameRecord):
            if len(record.frames) != len(record.timestamps):
                raise InvalidInputError(f"{len(record.frames)} frames but {len(record.timestamps)} timestamps")
            bounds.check_frame_record(record.seq, [_as_float(ts) for ts in record.timestamps])
        elif isinstance(record, TextRecord):
            # not `bounds.check_text_record`: an empty text reaches the log through the Ray API
            # (only HTTP asks for one character), and replay takes whatever was acknowledged
            if not isinstance(record.text, str) or len(record.text) > bounds.MAX_TEXT_CHARS:
                raise InvalidInputError(f"text is a string of at most {bounds.MAX_TEXT_CHARS} characters")
            bounds.check_text(record.text)
            bounds.check_time(_as_float(record.timestamp))
    except ValueError as err:
        raise InvalidInputError(str(err)) from None


def _as_float(ts):
    """numpy scalars are numbers.Real but not float: the bounds take them as floats."""
    return float(ts) if isinstance(ts, numbers.Real) and not isinstance(ts, bool) else ts


def _check_time(ts) -> None:
    try:
        bounds.check_time(_as_float(ts))
    except ValueError as err:
        raise InvalidInputError(f"timestamp {ts!r}: {err}") from None
