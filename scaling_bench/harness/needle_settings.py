"""Settings: one run of the needle benchmark (model, stream length and clips, needles, budgets,
variants, output), parsed from the command line by `needle.parse_args`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scaling_bench.harness.needle_sets import NEEDLE_SETS

CLIPS = ("bigbuckbunny", "bikes")  # the default stream loops both


@dataclass(slots=True)
class Settings:
    model: str
    out: Path
    frames: int = 120
    fps: float = 2.0
    window: int = 256
    sink: int = 16
    budgets: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    needles: int = len(NEEDLE_SETS[0])
    needle_set: int = 0  # which of NEEDLE_SETS
    clips: tuple[str, ...] = CLIPS  # looped, in this order
    filler_every: int = 12
    frames_per_call: int = 2
    answer_tokens: int = 12
    frame_size: int = 112
    extra_variants: list[str] = field(default_factory=list)
    oracle: bool = True
    independent: bool = False
    threads: int = 2
    quick: bool = False
