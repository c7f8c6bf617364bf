"""Settings: one run of the fidelity harness (models, videos, budgets, stream shape, output).

Parsed from the command line by `fidelity.parse_args`; read by the recorder (`fidelity_record.py`)
and the replay (`fidelity.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class Settings:
    models: list[str]
    videos: list[str]
    fps: float
    budgets: list[float]
    out: Path
    quick: bool = False
    window: int = 256
    sink: int = 16
    frames_per_call: int = 2
    answer_tokens: int = 8
    max_frames_per_video: int | None = None
    questions: int = 5
    sweep: bool = True
    frame_size: int = 224
    threads: int = 2
    variants: list[str] | None = None
