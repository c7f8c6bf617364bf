"""Where a client's frames come from: video files, cameras and network streams PyAV can open.

Files are decoded by `mosaic_ray.video.read_frames` (sampling at a target fps, resizing). Live
sources (a camera device such as /dev/video0, rtsp://, http(s):// URLs) are read here, frame by
frame as they arrive, sampled to the target fps by their own timestamps; they are paced by the
source itself. Every frame is a `VideoFrame(ts, rgb)` with `ts` in seconds from the first frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # PyAV is imported when a video is read: the client works without it otherwise
    from mosaic_ray.video import VideoFrame

LIVE_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://", "/dev/video")


def is_live(source: str | Path) -> bool:
    return str(source).startswith(LIVE_PREFIXES)


def frames_from(
    source: str | Path, fps: float | None = None, size: int | tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> Iterator[VideoFrame]:
    """Frames of `source` (file or live), at most one per 1/fps seconds of its clock."""
    if not is_live(source):
        from mosaic_ray.video import read_frames

        return read_frames(source, fps=fps, size=size, max_frames=max_frames)
    return _read_live(str(source), fps, size, max_frames)


def _read_live(url: str, fps: float | None, size, max_frames: int | None) -> Iterator[VideoFrame]:
    import av

    from mosaic_ray.video import VideoFrame

    options = {"rtsp_transport": "tcp"} if url.startswith("rtsp://") else {}
    fmt = "v4l2" if url.startswith("/dev/video") else None
    h_w = (size, size) if isinstance(size, int) else size
    with av.open(url, format=fmt, options=options) as container:
        stream = container.streams.video[0]
        t0, next_t, n = None, 0.0, 0
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base)
            t0 = t if t0 is None else t0
            ts = t - t0
            if fps is not None and ts + 1e-9 < next_t:
                continue
            rgb = frame.to_ndarray(format="rgb24", **({"height": h_w[0], "width": h_w[1]} if h_w else {}))
            yield VideoFrame(ts, rgb)
            n += 1
            if max_frames is not None and n >= max_frames:
                return
            if fps is not None:
                next_t = (math.floor(ts * fps + 1e-9) + 1) / fps
