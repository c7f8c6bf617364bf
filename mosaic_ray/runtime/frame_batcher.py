"""FrameBatcher: appends of different streams that meet in time share one engine call.

While one engine call runs, appends of other streams queue here; the next call takes them all
(up to `max_batch_frames`) through the engine's `append_frames_batch` when it has one (one vision
batch and one decoder forward for every stream, DESIGN.md section 2 "Batched execution"), or one
`append_frames` each otherwise. This is Serve's `@serve.batch` idea applied inside a shard.

Invariants:
- A stream has at most one append in flight (its `IngestQueue` drain awaits it under the stream's
  lock), so one engine call never holds two entries of one stream, and a stream's frames reach
  the engine in order.
- Failure isolation: when a batched call fails, each entry is retried alone, so one stream's bad
  frames fail only that stream's append. A failed call changes no stream, except the streams a
  `BatchPartlyAppliedError` names: their frames are in, so they are acknowledged, not retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from mosaic_ray.engine.interface import BatchPartlyAppliedError, Engine

EngineCall = Callable[..., Awaitable[Any]]


class FrameBatcher:
    def __init__(self, engine: Engine, call: EngineCall, max_batch_frames: int) -> None:
        self._engine = engine
        self._call = call
        self._batched = getattr(engine, "append_frames_batch", None)
        self.max_batch_frames = max_batch_frames
        self._queue: list[tuple[str, list[np.ndarray], list[float], asyncio.Future]] = []
        self._pumping = False
        self.calls = 0  # engine calls made (for tests and metrics)

    async def append(self, stream_id: str, frames: list[np.ndarray], timestamps: list[float]) -> int:
        """Append like `Engine.append_frames`; returns the frames the stream holds."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append((stream_id, frames, timestamps, done))
        if not self._pumping:
            self._pumping = True
            asyncio.get_running_loop().create_task(self._pump())
        return await done

    async def _pump(self) -> None:
        try:
            while self._queue:
                await self._run(self._take())
        finally:
            self._pumping = False

    def _take(self) -> list[tuple]:
        n, frames = 0, 0
        for item in self._queue:
            if n and frames + len(item[1]) > self.max_batch_frames:
                break
            n, frames = n + 1, frames + len(item[1])
        batch, self._queue = self._queue[:n], self._queue[n:]
        return batch

    async def _run(self, batch: list[tuple]) -> None:
        if len(batch) > 1 and self._batched is not None:
            try:
                self.calls += 1
                held = await self._call(self._batched, [(sid, f, t) for sid, f, t, _ in batch])
            except BatchPartlyAppliedError as exc:  # those streams are in: never append them twice
                for sid, _, _, done in batch:
                    if sid in exc.applied:
                        _settle(done, result=exc.applied[sid])
                batch = [item for item in batch if item[0] not in exc.applied]
            except Exception:
                pass  # isolate the culprit below
            else:
                for (_, _, _, done), n in zip(batch, held):
                    _settle(done, result=n)
                return
        for sid, frames, stamps, done in batch:
            try:
                self.calls += 1
                _settle(done, result=await self._call(self._engine.append_frames, sid, frames, stamps))
            except Exception as exc:
                _settle(done, error=exc)


def _settle(done: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if done.done():  # its caller was cancelled; the frames are in (or not) all the same
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
