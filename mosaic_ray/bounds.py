"""The bounds of every value a client sends that reaches an engine or a frame log: one definition,
shared by every path in (HTTP, OpenAI chat, WebSocket) and by the replay of a log.

It imports nothing of the project, so any layer may use it: `serve/schemas.py` builds its pydantic
types from these constants and checks (the HTTP and WebSocket schemas are those types), the
engine's sampler clamps with the same floors, the router checks ids with the same grammar, and a
frame log's replay checks each record with `check_frame_record` / `check_text_record`.

Invariants, for a value that passed its check here:
- a seq or a seed fits a signed 64-bit integer (frame logs, torch generators);
- a stream time is finite and in [0, MAX_TIME_S] (the engine turns it into positions);
- a temperature below MIN_TEMPERATURE is 0 (greedy) and a top_p is at least MIN_TOP_P, so the
  sampler never divides logits into inf or keeps an empty nucleus;
- a stream id matches STREAM_ID_PATTERN as a whole (no trailing newline: `re.match` with `$` would
  let one through), so it is a safe file name and one a client can send back;
- text has no control character but tab and newlines, and no lone surrogate.
Checks raise `ValueError` (pydantic turns it into a 422; replay skips or quarantines the record).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# seq and seed are 64-bit signed integers wherever they are stored (frame logs, torch generators).
MAX_SEQ = 2**63 - 1
# Stream-clock seconds: 30 years. Bounds what the engine turns into positions and logs.
MAX_TIME_S = 1e9
# Below this a temperature is greedy (0). logits / t overflows float32 once t < ~1e-38 * |logit|;
# 1e-4 is far above that, and at 1e-4 sampling already picks the argmax unless two logits are
# within ~1e-3 of each other: the same answer as greedy in every case that matters.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 10.0
# A smaller top_p is raised to this. Any top_p below the best token's probability keeps that token
# alone, and the best of a vocabulary of at most 1e6 tokens has probability >= 1e-6: the floor
# changes no answer, while a top_p that rounds to 0 in float32 (< ~1.4e-45) would keep none.
MIN_TOP_P = 1e-6
# Ceiling of any text field whatever the config says (`ingress.max_text_chars` and
# `ingress.max_question_chars` are the usual limits).
MAX_TEXT_CHARS = 1 << 20

# Stream ids: what the router, the frame logs (file names) and every route accept.
STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
STREAM_ID_RE = re.compile(STREAM_ID_PATTERN)

# Unicode's Cc (C0, DEL, C1) but tab and newlines, and Cs (surrogates): one regex search, so a
# megabyte of text is checked in about a millisecond.
_FORBIDDEN_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def is_stream_id(value: object) -> bool:
    """True when `value` is a stream id: the whole string matches, a trailing newline included."""
    return isinstance(value, str) and STREAM_ID_RE.fullmatch(value) is not None


def check_stream_id(value: str) -> str:
    if not is_stream_id(value):
        raise ValueError(f"a stream id matches {STREAM_ID_PATTERN}")
    return value


def check_text(value: str) -> str:
    bad = _FORBIDDEN_CHARS.search(value)
    if bad is not None:
        raise ValueError(f"text may not contain the control character U+{ord(bad.group()):04X}")
    return value


def check_time(ts: float) -> float:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts) or not 0 <= ts <= MAX_TIME_S:
        raise ValueError(f"a stream time is a finite number of seconds in [0, {MAX_TIME_S:g}]")
    return float(ts)


def check_seq(seq: int) -> int:
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise ValueError("seq and seed are integers in [0, 2**63-1]")
    return seq


def greedy_below_floor(temperature: float) -> float:
    """The temperature the sampler uses: 0 (greedy) below MIN_TEMPERATURE."""
    return 0.0 if temperature < MIN_TEMPERATURE else temperature


def top_p_floor(top_p: float) -> float:
    """The top_p the sampler uses: at least MIN_TOP_P (see there: no answer changes)."""
    return max(top_p, MIN_TOP_P)


def check_frame_record(seq: int | None, timestamps: Sequence[float]) -> None:
    """What a frame batch must be to be appended or replayed: its seq in 63 bits (or none), at
    least one frame, every time in range."""
    if seq is not None:
        check_seq(seq)
    if not timestamps:
        raise ValueError("a frame batch holds at least one frame")
    for ts in timestamps:
        check_time(ts)


def check_text_record(text: str, ts: float, max_chars: int = MAX_TEXT_CHARS) -> None:
    """What a text entry must be to be appended or replayed."""
    if not isinstance(text, str) or not 1 <= len(text) <= max_chars:
        raise ValueError(f"text is 1 to {max_chars} characters")
    check_text(text)
    check_time(ts)
