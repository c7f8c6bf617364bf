"""Real video frames for the load generator, decoded once and cycled (a short clip feeds long runs).

The GPU machine has no PyAV: decode here and carry the frames there as an .npz file

    python -m scaling_bench.harness.video_frames --size 336 --out scratch/frames_336.npz [--video PATH]

then pass `--frames-file scratch/frames_336.npz` to a scaling benchmark.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def decode(size: int, n: int = 48, fps: float = 4.0, video: str | None = None) -> tuple[list[np.ndarray], str]:
    """Up to `n` RGB frames of `video` (default: the sample video), sampled at `fps`, `size` px."""
    from mosaic_ray.video import default_video, read_frames

    path = _resolve(video) if video else default_video()
    return [f.rgb for f in read_frames(path, fps=fps, max_frames=n, size=size)], path.name


def _resolve(video: str) -> Path:
    """A file, or a clip name of `mosaic_ray.video.sample_videos` (vtest, bikes, ...)."""
    from mosaic_ray.video import sample_videos

    if Path(video).exists():
        return Path(video)
    found = sample_videos()
    if video not in found:
        raise SystemExit(f"--video {video!r}: no such file or clip (clips: {', '.join(sorted(found))})")
    return found[video]


def save(path: str | Path, frames: list[np.ndarray], source: str) -> None:
    np.savez_compressed(path, frames=np.stack(frames), source=np.array(source))


def load(path: str | Path) -> tuple[list[np.ndarray], str]:
    with np.load(path) as z:
        return list(z["frames"]), str(z["source"])


def real_frames(size: int, n: int = 48, fps: float = 4.0, frames_file: str | None = None,
                video: str | None = None) -> tuple[list[np.ndarray], str]:
    """Frames from `frames_file` (made by `save`), else decoded from `video` / the sample video with
    PyAV, else random frames of the same shape when PyAV is missing; returns (frames, source name)."""
    if frames_file:
        frames, source = load(frames_file)
        if frames[0].shape[:2] != (size, size):
            raise ValueError(f"{frames_file} holds {frames[0].shape[:2]} frames, not {size}x{size} (--size)")
        return frames, source
    try:
        frames, source = decode(size, n, fps, video)
        if frames:
            return frames, source
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)], "random"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Decode a video's frames once, for a machine without PyAV.")
    p.add_argument("--size", type=int, default=336)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--fps", type=float, default=4.0)
    p.add_argument("--video", default=None, help="a video file or a clip name such as vtest (default: the sample video)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    frames, source = decode(a.size, a.frames, a.fps, a.video)
    save(a.out, frames, source)
    print(f"wrote {len(frames)} frames of {source} ({a.size}px) to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
