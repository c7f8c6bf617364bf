"""The range check every typed config runs at construction: a bad value fails at start, naming the
field, its allowed range and the value it got."""

from __future__ import annotations


class RangeError(ValueError):
    """A value outside its field's range. `str()` is the whole sentence ("Cls.field must be in
    [lo, hi], got v"); `name`, `value` and `bounds` ("[lo, hi]") let a config loader say it again
    under the field's place in a file (`mosaic_ray/config_load.py`) without a second copy of the
    bounds."""

    def __init__(self, name: str, value, bounds: str) -> None:
        super().__init__(f"{name} must be in {bounds}, got {value!r}")
        self.name, self.value, self.bounds = name, value, bounds


def check_range(name: str, value, low=None, high=None, *, low_open: bool = False) -> None:
    """Raise RangeError naming the field and its range when `value` falls outside [low, high]."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and value > high
    )
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bracket = "(" if low_open else "["
        raise RangeError(name, value, f"{bracket}{lo}, {hi}]")
