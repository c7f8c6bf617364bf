"""The range check every typed config runs at construction: a bad value fails at start, naming the
field, its allowed range and the value it got."""

from __future__ import annotations


def check_range(name: str, value, low=None, high=None, *, low_open: bool = False) -> None:
    """Raise ValueError naming the field and its range when `value` falls outside [low, high]."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and value > high
    )
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{lo}, {hi}], got {value!r}")
