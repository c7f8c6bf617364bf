"""Real video frames for the load generator, decoded once and cycled (a short clip feeds long runs)."""

from __future__ import annotations

import numpy as np


def real_frames(size: int, n: int = 48, fps: float = 4.0) -> tuple[list[np.ndarray], str]:
    """Up to `n` RGB frames of the default sample video (PyAV), or random frames of the same shape
    when PyAV is missing (the GPU machine may lack it); returns (frames, source name)."""
    try:
        from mosaic_ray.video import default_video, read_frames

        path = default_video()
        frames = [f.rgb for f in read_frames(path, fps=fps, max_frames=n, size=size)]
        if frames:
            return frames, path.name
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)], "random"
