"""FramePruner: drop near-duplicate frames of a stream before the vision encoder.

Each new frame is compared with the stream's last *kept* frame through a small grayscale
thumbnail (box-filtered to `thumb_size` px): the mean absolute difference of the two thumbnails,
in pixel range 0-1, is the frame's news. A frame with news <= `threshold` is pruned: it is never
encoded and adds no token, but its timestamp still advances the stream's clock, so time-range
questions and later timestamp checks see the stream's true time. Encoder-free: no feature, no
model, ~0.1 ms a frame on a CPU core.

Invariants:
- The first frame of a stream is always kept, and a frame is kept at least every `max_gap_s`
  seconds of stream clock (when > 0), however static the scene.
- The reference is the last kept frame, never the last seen one: slow drift accumulates until it
  passes the threshold and is kept (comparing neighbours would prune a slow pan forever).
- `plan` is pure; `commit` applies a plan once the engine holds the kept frames. A failed append
  therefore leaves the pruner's state as it was.
- Decisions depend only on the stream's frames and timestamps in order: replaying the same frames
  prunes the same ones, and a migrated stream carries its state (`export` / `restore`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mosaic_ray.config import PruningConfig
from mosaic_ray.engine.interface import InvalidInputError

# Stream options `configure` understands (`session.update`, `StreamEngine.configure_stream`).
OPTIONS = ("pruning", "prune_threshold")


@dataclass(slots=True)
class PruneState:
    """One stream's pruning: its switch, threshold, reference thumbnail and count of pruned frames."""

    enabled: bool
    threshold: float
    ref: np.ndarray | None = None  # float32 [thumb_size, thumb_size] in 0-1, of the last kept frame
    ref_ts: float = -math.inf
    pruned: int = 0


@dataclass(slots=True)
class PrunePlan:
    """What one append keeps (`keep[i]` for frame i) and the reference after it."""

    keep: list[bool]
    ref: np.ndarray | None
    ref_ts: float

    @property
    def pruned(self) -> int:
        return len(self.keep) - sum(self.keep)

    def kept(self, items: list) -> list:
        return [x for x, k in zip(items, self.keep) if k]


class FramePruner:
    def __init__(self, config: PruningConfig) -> None:
        self.config = config

    def new_state(self) -> PruneState:
        return PruneState(self.config.enabled, self.config.threshold)

    # ------------------------------------------------------------------ decisions
    def thumbnail(self, frame: np.ndarray) -> np.ndarray:
        """Grayscale, box-filtered to thumb_size x thumb_size, float32 in 0-1."""
        side = self.config.thumb_size
        # Large frames are subsampled to at most ~4x the thumbnail first (a strided view): the box
        # filter then averages 4x4 samples per cell, and a 1080p frame costs ~0.2 ms, not ~4 ms,
        # on the engine thread. Frames up to 4 x thumb_size - 1 px are used whole.
        step = max(1, min(frame.shape[:2]) // (4 * side))
        small = np.ascontiguousarray(frame[::step, ::step]) if step > 1 else frame
        gray = Image.fromarray(small).convert("L").resize((side, side), Image.BOX)
        return np.asarray(gray, dtype=np.float32) / 255.0

    @staticmethod
    def difference(a: np.ndarray, b: np.ndarray) -> float:
        """Mean absolute difference of two thumbnails (0 = identical, 1 = black vs white)."""
        return float(np.abs(a - b).mean())

    def plan(self, state: PruneState, frames: list[np.ndarray], timestamps: list[float]) -> PrunePlan:
        """Which of `frames` to keep; `state` is not changed (see `commit`)."""
        if not state.enabled:
            return PrunePlan([True] * len(frames), state.ref, state.ref_ts)
        gap = self.config.max_gap_s
        ref, ref_ts, keep = state.ref, state.ref_ts, []
        for frame, ts in zip(frames, timestamps):
            thumb = self.thumbnail(frame)
            fresh = (ref is None or self.difference(thumb, ref) > state.threshold
                     or (gap > 0 and float(ts) - ref_ts >= gap))
            keep.append(fresh)
            if fresh:
                ref, ref_ts = thumb, float(ts)
        return PrunePlan(keep, ref, ref_ts)

    @staticmethod
    def commit(state: PruneState, plan: PrunePlan) -> None:
        state.ref, state.ref_ts = plan.ref, plan.ref_ts
        state.pruned += plan.pruned

    # ------------------------------------------------------------------ per-stream options
    @staticmethod
    def configure(state: PruneState, options: dict) -> dict:
        """Apply `{"pruning": bool, "prune_threshold": float}` (either may be absent); returns the
        stream's options after the change. Validated first: a bad option changes nothing."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidInputError(f"unknown stream options {unknown}; known: {list(OPTIONS)}")
        enabled = options.get("pruning", state.enabled)
        threshold = options.get("prune_threshold", state.threshold)
        if not isinstance(enabled, bool):
            raise InvalidInputError(f"pruning must be true or false, got {enabled!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise InvalidInputError(f"prune_threshold must be a number in [0, 1], got {threshold!r}")
        state.enabled, state.threshold = enabled, float(threshold)
        return options_of(state)

    # ------------------------------------------------------------------ migration
    @staticmethod
    def export(state: PruneState) -> tuple[dict, dict[str, torch.Tensor]]:
        """Plain meta + tensors (the reference thumbnail, when there is one) for a snapshot."""
        meta = {"enabled": state.enabled, "threshold": state.threshold, "ref_ts": state.ref_ts,
                "pruned": state.pruned}
        tensors = {} if state.ref is None else {"pruning.ref": torch.from_numpy(state.ref.copy())}
        return meta, tensors

    def restore(self, meta: dict | None, tensors: dict[str, torch.Tensor]) -> PruneState:
        """The state `export` described; a snapshot without pruning data gives a fresh state."""
        if meta is None:
            return self.new_state()
        ref = tensors.get("pruning.ref")
        return PruneState(bool(meta["enabled"]), float(meta["threshold"]),
                          None if ref is None else ref.numpy().astype(np.float32, copy=True),
                          float(meta["ref_ts"]), int(meta["pruned"]))


def options_of(state: PruneState) -> dict:
    return {"pruning": state.enabled, "prune_threshold": state.threshold}
