"""StreamSlot: one stream's place on a shard: admission, ordering and ingest bookkeeping.

Every request for a stream enters through `admit()`, and every engine operation on the stream
runs under `lock`. Together they give the guarantees migration relies on:

- Operations on one stream reach the engine one at a time, in admission order (`lock` is a FIFO
  asyncio lock): a question sees every frame batch acknowledged before it was asked.
- While the slot is frozen no request is admitted; admitted ones wait, held, in `admit()`.
  `freeze()` returns once every request admitted before it has finished, so an export taken then
  is the whole stream, never half of an append.
- `thaw()` lets the held requests in, here. `release(shard)` (the stream now lives elsewhere)
  sends each of them `StreamMovedError(shard)`, and the caller retries there: none is lost, none
  is answered from half-moved state.
- `last_seq` is the highest frame-batch seq the engine holds; only ingest advances it, and only
  after the engine accepted the frames. It travels with the stream when it migrates.
- `log_order` fixes the place of each of the stream's log records when its operation reaches the
  engine (`log_order.py`); records are written in that order, only for accepted operations.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from mosaic_ray.engine.interface import UnknownStreamError
from mosaic_ray.runtime.errors import ShardBusyError, StreamMovedError
from mosaic_ray.runtime.durability.log_order import LogOrder
from mosaic_ray.runtime.actors.shard_metrics import DecayingRate


@dataclass(eq=False)
class FrameBatch:
    """Frames of one HTTP request waiting for the engine. `decoded` resolves to their pixels
    (decoding runs while the batch waits its turn); `done` to the batch's acknowledgement."""

    seq: int | None  # the seq it holds once accepted
    count: int
    timestamps: list[float]
    decoded: asyncio.Future
    frames: list[Any] = field(default_factory=list)
    # The frames as they arrived (still encoded): what the stream's frame log records.
    encoded: list[Any] = field(default_factory=list)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # The seq the client sent (None: the next one); a retried batch's seq is decided from it again.
    requested: int | None = None


class StreamSlot:
    def __init__(
        self, stream_id: str, rate_window_s: float, last_seq: int = -1, rates: tuple[float, float] = (0.0, 0.0)
    ) -> None:
        self.stream_id = stream_id
        self.last_seq = last_seq
        self.lock = asyncio.Lock()
        self.log_order = LogOrder(last_seq)
        self.pending: list[FrameBatch] = []
        self.draining = False
        # Frames/s and questions/s of this stream; carried across a migration (`rates`), so a
        # moved stream weighs on its new shard what it weighed on the old one.
        self.ingest_rate = DecayingRate(rate_window_s, rates[0])
        self.query_rate = DecayingRate(rate_window_s, rates[1])
        self._inflight = 0
        self._entered = 0  # requests in `admit`, held ones included: what `requests` reports
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()  # set: requests are admitted
        self._open.set()
        self._moved_to: str | None = None
        self._closed = False

    def rates(self) -> tuple[float, float]:
        return self.ingest_rate.rate(), self.query_rate.rate()

    @property
    def requests(self) -> int:
        """Requests of this stream admitted or held now (the shard bounds it: `max_stream_requests`)."""
        return self._entered

    @property
    def frozen(self) -> bool:
        return not self._open.is_set()

    @asynccontextmanager
    async def admit(self, hold_timeout_s: float) -> AsyncIterator[None]:
        """Enter one request; waits (held) while frozen, for at most `hold_timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold_timeout_s
        self._entered += 1
        try:
            # Re-test after every wake-up: the slot may have been frozen again in between.
            while not self._open.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ShardBusyError(f"stream {self.stream_id!r} is migrating; retry", 1.0)
                try:
                    await asyncio.wait_for(self._open.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
            self._raise_if_gone()
            self._inflight += 1
            self._idle.clear()
            try:
                yield
            finally:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.set()
        finally:
            self._entered -= 1

    async def freeze(self) -> None:
        """Stop admitting; return when every admitted request has finished."""
        self._raise_if_gone()
        if self.frozen:
            raise ShardBusyError(f"stream {self.stream_id!r} is already migrating", 1.0)
        self._open.clear()
        await self._idle.wait()

    @property
    def busy(self) -> bool:
        """Some admitted request has not finished."""
        return self._inflight > 0

    async def wait_idle(self) -> None:
        """Return once no admitted request is in flight (a draining shard waits for this)."""
        await self._idle.wait()

    def thaw(self) -> None:
        """Admit again, here (a migration was aborted)."""
        self._open.set()

    def release(self, moved_to: str) -> None:
        """The stream now lives on `moved_to`: every held and future request is redirected."""
        self._moved_to = moved_to
        self._open.set()

    def close(self) -> None:
        """The stream was deleted: held and future requests get `UnknownStreamError`."""
        self._closed = True
        self._open.set()

    def _raise_if_gone(self) -> None:
        if self._moved_to is not None:
            raise StreamMovedError(self.stream_id, self._moved_to)
        if self._closed:
            raise UnknownStreamError(self.stream_id)
