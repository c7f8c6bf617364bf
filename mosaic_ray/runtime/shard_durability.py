"""ShardDurability: a shard's verbs for recovery and shutdown (docs/reliability.md).

A mixin of `ShardActor` (shard.py), kept apart so each file holds one concept. It uses the
actor's `_log` (`ShardLog`, None when logs are off), `_slots`, `_moved`, `_spec`, `_batcher`,
`_engine`, `_call`, `_fatal`, `_draining` and `name`.

- `recover_stream`: rebuild a stream another shard held, from its frame log (`log_replay.py`).
  The router holds the stream's requests off (503) until it returns, and maps the stream here
  only then: no request is answered from a half-rebuilt stream.
- `drain`: stop taking requests (503 `ShuttingDownError`, raised by the actor's `_slot`), let the
  admitted ones finish, fsync the logs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mosaic_ray.engine.interface import StreamExistsError, UnknownStreamError
from mosaic_ray.runtime.log_replay import replay
from mosaic_ray.runtime.stream_slot import StreamSlot


class ShardDurability:
    async def recover_stream(self, stream_id: str) -> dict[str, Any]:
        """Rebuild `stream_id` from its frame log and serve it here (its shard died, or the runtime
        restarted). The router holds the stream's requests off (503) until this returns."""
        if self._log is None:
            raise UnknownStreamError(f"stream {stream_id!r}: frame logs are off, nothing to rebuild from")
        if stream_id in self._slots:
            raise StreamExistsError(f"stream {stream_id!r} exists on {self.name}")
        start = time.perf_counter()
        if not await self._log.exists(stream_id):
            raise UnknownStreamError(f"stream {stream_id!r} has no frame log")
        records = await self._log.read(stream_id)
        if await self._call(self._engine.has_stream, stream_id):  # a replay cut short before
            await self._call(self._engine.close_stream, stream_id)
        await self._call(self._engine.open_stream, stream_id)
        try:
            done = await replay(
                records,
                lambda frames, stamps: self._batcher.append(stream_id, frames, stamps),
                lambda text, ts: self._call(self._engine.append_text, stream_id, text, ts),
                self._log.decode,
                self._log.spec.replay_batch_frames,
                lambda options: self._call(self._engine.configure_stream, stream_id, options),
            )
        except BaseException:
            if self._fatal is None:
                await self._call(self._engine.close_stream, stream_id)
            raise
        self._slots[stream_id] = StreamSlot(stream_id, self._spec.rate_window_s, done.last_seq)
        self._moved.pop(stream_id, None)
        return {"id": stream_id, "shard": self.name, "last_seq": done.last_seq, "frames": done.frames,
                "batches": done.batches, "texts": done.texts, "options": done.options, "skipped": done.skipped,
                "engine_calls": done.engine_calls, "seconds": time.perf_counter() - start}

    async def drain(self, timeout_s: float) -> dict[str, Any]:
        """Stop taking requests (503 `ShuttingDownError`), wait up to `timeout_s` for the admitted
        ones to finish, then fsync the frame logs. Returns how many were still running."""
        self._draining = True
        slots = list(self._slots.values())
        try:
            await asyncio.wait_for(asyncio.gather(*(s.wait_idle() for s in slots)), timeout_s)
        except asyncio.TimeoutError:
            pass
        if self._log is not None:
            await self._log.sync()
        return {"shard": self.name, "streams": len(self._slots), "unfinished": sum(s.busy for s in slots)}
