"""FakeEngine: a deterministic engine that honours `mosaic_ray.engine.interface.Engine`.

Used by the runtime, Serve and client tests in place of the real `StreamEngine` (named by the
factory path "tests.runtime.fake_engine:FakeEngine"). What makes it a useful stand-in:

- answers are a pure function of the stream's frames (pixel statistics), text, earlier Q/A turns
  and the question, so isolation between streams and identity across a migration are testable;
- each answered question joins the context, as the interface requires, so a migration that lost
  the history would change the next answer;
- export/import carry real tensors of several dtypes (float32 features, float64 timestamps,
  bfloat16 "keys"), so migration moves and verifies real bytes;
- incremental snapshots (`export_delta` / `import_deltas`): frames only grow, so a delta carries
  the frames after the part before (its generation is the frame count) and the notes whole;
- optional delays stand for GPU work (`frame_delay_s` blocks the engine thread per frame,
  `token_delay_s` awaits between deltas); the text "__crash__" raises a RuntimeError (one request
  the engine fails on, the engine itself fine: its probe passes), and the text "__break__" breaks
  the engine for good (every later call raises RuntimeError, the probe too): a lost GPU.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mosaic_ray.engine.interface import (
    AnswerEnd,
    AskRequest,
    Engine,
    InvalidInputError,
    StreamExistsError,
    UnknownStreamError,
)

FACTORY = "tests.runtime.fake_engine:FakeEngine"  # EngineSpec.factory naming this engine
GRID = 4  # a frame's feature = mean RGB of a GRID x GRID grid of cells
FEATURE_DIM = GRID * GRID * 3
KEY_DIM = 16
TOKENS_PER_FRAME = 16
CRASH_TEXT = "__crash__"
BREAK_TEXT = "__break__"


def frame_feature(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    rows = np.linspace(0, h, GRID + 1).astype(int)
    cols = np.linspace(0, w, GRID + 1).astype(int)
    cells = [
        frame[rows[i] : rows[i + 1], cols[j] : cols[j + 1]].reshape(-1, 3).mean(axis=0)
        for i in range(GRID)
        for j in range(GRID)
    ]
    return (np.concatenate(cells) / 255.0).astype(np.float32)


@dataclass
class _Stream:
    features: list[np.ndarray] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    texts: list[list[Any]] = field(default_factory=list)  # [ts, text]

    def keys(self) -> torch.Tensor:
        feats = torch.from_numpy(np.stack(self.features)) if self.features else torch.zeros(0, FEATURE_DIM)
        return feats[:, :KEY_DIM].to(torch.bfloat16)


class FakeEngine(Engine):
    def __init__(self, frame_delay_s: float = 0.0, token_delay_s: float = 0.0,
                 appends_during_answers: bool = False, busy_share: float | None = None) -> None:
        self.frame_delay_s = frame_delay_s
        self.token_delay_s = token_delay_s
        self.appends_during_answers = appends_during_answers
        # when set, stats() reports this share of the wall time as busy (the capacity gate's input)
        self.busy_share = busy_share
        self._born = time.monotonic()
        self._streams: dict[str, _Stream] = {}
        self.broken = False

    def open_stream(self, stream_id: str) -> None:
        self._check_alive()
        if stream_id in self._streams:
            raise StreamExistsError(f"stream {stream_id!r} exists")
        self._streams[stream_id] = _Stream()

    def close_stream(self, stream_id: str) -> None:
        self._get(stream_id)
        del self._streams[stream_id]

    def has_stream(self, stream_id: str) -> bool:
        return stream_id in self._streams

    def list_streams(self) -> list[str]:
        return sorted(self._streams)

    def append_frames(self, stream_id: str, frames: list[np.ndarray], timestamps: list[float]) -> int:
        return self.append_frames_batch([(stream_id, frames, timestamps)])[0]

    def append_frames_batch(self, items: list[tuple[str, list[np.ndarray], list[float]]]) -> list[int]:
        """Frames of several streams in one call (as `StreamEngine` has): all checked, then all applied."""
        if len({sid for sid, _, _ in items}) != len(items):
            raise InvalidInputError("append_frames_batch: one entry per stream")
        for sid, frames, timestamps in items:
            self._check(self._get(sid), frames, timestamps)
        if self.frame_delay_s:
            time.sleep(self.frame_delay_s * sum(len(f) for _, f, _ in items))
        held = []
        for sid, frames, timestamps in items:
            s = self._streams[sid]
            s.features.extend(frame_feature(f) for f in frames)
            s.timestamps.extend(float(t) for t in timestamps)
            held.append(len(s.features))
        return held

    @staticmethod
    def _check(s: _Stream, frames: list[np.ndarray], timestamps: list[float]) -> None:
        if len(frames) != len(timestamps):
            raise InvalidInputError(f"{len(frames)} frames but {len(timestamps)} timestamps")
        for f in frames:
            if not (isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3):
                raise InvalidInputError("frames must be uint8 arrays [H, W, 3]")
            if f.shape[0] < GRID or f.shape[1] < GRID:
                raise InvalidInputError(f"frames must be at least {GRID}x{GRID}")
        last = s.timestamps[-1] if s.timestamps else -math.inf
        for t in timestamps:
            if not math.isfinite(t) or t < last:
                raise InvalidInputError(f"timestamps must be finite and non-decreasing, got {t} after {last}")
            last = t

    def append_text(self, stream_id: str, text: str, timestamp: float) -> None:
        s = self._get(stream_id)
        if text == CRASH_TEXT:
            raise RuntimeError("fake engine crashed (asked to)")
        if text == BREAK_TEXT:
            self.broken = True
            raise RuntimeError("fake engine broke (asked to)")
        if not text:
            raise InvalidInputError("text must be non-empty")
        s.texts.append([float(timestamp), text])

    async def ask(self, stream_id: str, request: AskRequest) -> AsyncIterator[str]:
        async for item in self.ask_until_end(stream_id, request):
            if isinstance(item, str):
                yield item

    async def ask_until_end(self, stream_id: str, request: AskRequest) -> AsyncIterator[str | AnswerEnd]:
        """A word is a token: the answer's first max_tokens words ("length" when that cut it), the
        question's words are the prompt tokens."""
        s = self._get(stream_id)
        full = self._answer(s, request).split(" ")
        words = full[: request.max_tokens]
        for i, word in enumerate(words):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            yield word if i == 0 else " " + word
        now = s.timestamps[-1] if s.timestamps else 0.0
        s.texts.append([now, f"Q: {request.question}"])
        s.texts.append([now, "A: " + " ".join(words)])
        yield AnswerEnd("length" if len(words) < len(full) else "stop", len(request.question.split()), len(words))

    def stream_info(self, stream_id: str) -> dict[str, Any]:
        s = self._get(stream_id)
        n = len(s.features)
        return {
            "frames": n,
            "tokens": n * TOKENS_PER_FRAME,
            "texts": len(s.texts),
            "duration_s": (s.timestamps[-1] - s.timestamps[0]) if n else 0.0,
            "kv_bytes_device": n * KEY_DIM * 2,
            "kv_bytes_host": n * FEATURE_DIM * 4,
        }

    def stats(self) -> dict[str, Any]:
        infos = [self.stream_info(sid) for sid in self._streams]
        return {
            "streams": len(infos),
            "frames_total": sum(i["frames"] for i in infos),
            "kv_bytes_device": sum(i["kv_bytes_device"] for i in infos),
            "kv_bytes_host": sum(i["kv_bytes_host"] for i in infos),
            **({"busy_s_total": self.busy_share * (time.monotonic() - self._born)} if self.busy_share is not None else {}),
        }

    def export_stream(self, stream_id: str) -> dict[str, Any]:
        s = self._get(stream_id)
        feats = np.stack(s.features) if s.features else np.zeros((0, FEATURE_DIM), np.float32)
        return {
            "meta": {"texts": [list(t) for t in s.texts], "frames": len(s.features)},
            "tensors": {
                "features": torch.from_numpy(feats.copy()),
                "timestamps": torch.tensor(s.timestamps, dtype=torch.float64),
                "keys": s.keys(),
            },
        }

    def import_stream(self, stream_id: str, state: dict[str, Any]) -> None:
        if stream_id in self._streams:
            raise StreamExistsError(f"stream {stream_id!r} exists")
        t, meta = state["tensors"], state["meta"]
        feats = t["features"].numpy()
        if feats.shape != (meta["frames"], FEATURE_DIM) or len(t["timestamps"]) != meta["frames"]:
            raise InvalidInputError("inconsistent stream state")
        s = _Stream(list(feats.copy()), t["timestamps"].tolist(), [list(x) for x in meta["texts"]])
        if not torch.equal(s.keys().view(torch.int16), t["keys"].view(torch.int16)):
            raise InvalidInputError("keys do not match features")
        self._streams[stream_id] = s

    def export_delta(self, stream_id: str, since: int) -> dict[str, Any]:
        part = self.export_stream(stream_id)
        n = part["meta"]["frames"]
        if not 0 <= since <= n:
            raise InvalidInputError(f"since {since} is not a part of this stream (it holds {n} frames)")
        part["tensors"] = {k: t[since:].clone() for k, t in part["tensors"].items()}
        part["meta"].update(since=since, generation=n)
        return part

    def import_deltas(self, stream_id: str, parts: list[dict[str, Any]]) -> None:
        held = 0
        for part in parts:
            if part["meta"].get("since", 0) != held:
                raise InvalidInputError(f"a snapshot part since frame {part['meta'].get('since')} after {held} frames")
            held = part["meta"]["frames"]
        tensors = {k: torch.cat([p["tensors"][k] for p in parts]) for k in parts[-1]["tensors"]}
        meta = {k: v for k, v in parts[-1]["meta"].items() if k not in ("since", "generation")}
        self.import_stream(stream_id, {"meta": meta, "tensors": tensors})

    # ------------------------------------------------------------------ internals
    def _check_alive(self) -> None:
        if self.broken:
            raise RuntimeError("fake engine is broken")

    def _get(self, stream_id: str) -> _Stream:
        self._check_alive()
        if stream_id not in self._streams:
            raise UnknownStreamError(f"stream {stream_id!r} not found")
        return self._streams[stream_id]

    @staticmethod
    def _answer(s: _Stream, request: AskRequest) -> str:
        lo = -math.inf if request.since is None else request.since
        hi = math.inf if request.until is None else request.until
        chosen = [f for f, t in zip(s.features, s.timestamps) if lo <= t <= hi]
        h = hashlib.sha256(request.question.encode())
        for f in chosen:
            h.update(f.tobytes())
        for ts, text in s.texts:
            h.update(f"{ts}:{text}".encode())
        brightness = float(np.mean(chosen)) if chosen else 0.0
        return (
            f"I saw {len(chosen)} frames and {len(s.texts)} notes; "
            f"brightness {brightness:.3f}; digest {h.hexdigest()[:12]}."
        )


def fake_app_config(name: str, num_shards: int = 2, **engine_kwargs: Any) -> dict[str, Any]:
    """An `AppConfig` (as Serve's args) running this engine on `num_shards` logical GPUs."""
    return {
        "runtime": {
            "name": name,
            "num_shards": num_shards,
            "engine": {"factory": FACTORY, "kwargs": engine_kwargs},
            "shard": {"num_gpus": 1, "num_cpus": 0},
            "router": {"health_interval_s": 0},
            "migration": {"timeout_s": 20},
        },
        "ingress": {"num_cpus": 0, "max_body_bytes": 4 << 20},
    }
