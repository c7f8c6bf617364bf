"""EngineRunner: the one thread that touches a shard's engine.

Why a thread of its own: engine verbs are synchronous and heavy (a GPU prefill), and `ask` is an
async iterator whose steps are heavy too. Run on the actor's event loop they would stall every
other request of the shard, its load reports and its health check. Run on a pool of threads they
would need an engine that is thread-safe. So the engine gets one thread with its own event loop:

- the engine is only ever touched from that thread (engines need not be thread-safe);
- calls run in the order they were submitted (`asyncio.run_coroutine_threadsafe` is FIFO);
- concurrent `ask` iterators are advanced on that loop, so an engine whose `ask` awaits between
  decode steps can interleave, and batch, questions of many streams.

Verbs: call (a sync engine method) / schedule (the same, queued now, awaited later) / await_ (a
coroutine of the engine) / iterate (an async iterator from the engine) / close.

Order: a call is queued on the engine's loop when `schedule` (or the first await of `call`) runs,
and calls run in that order. So a caller that needs "A before B" on the engine (a stream's frames
before its question) only has to queue A before B, not to wait for A: the stream's lock in the
shard covers the queueing, not the engine's work (the engine's loop runs a step of its step loop
between two calls: at 48 streams on an H200 a step with an ingest forward took 180 ms on
average, docs/benchmarks.md 10.3).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class EngineRunner:
    def __init__(self, name: str = "engine") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{name}-runner", daemon=True)
        self._thread.start()

    def call_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine thread and wait (for constructors, outside any loop)."""
        return asyncio.run_coroutine_threadsafe(self._run(fn, args), self._loop).result()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine thread; the caller's loop stays free meanwhile."""
        return await self.schedule(fn, *args)

    def schedule(self, fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        """Queue `fn(*args)` on the engine thread now (in order with every other call) and return
        the future of its result, to await on the caller's running loop."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._run(fn, args), self._loop))

    def await_(self, make_coro: Callable[[], Any]) -> "asyncio.Future[Any]":
        """Queue now the coroutine `make_coro()`, to be created and awaited on the engine thread
        (an engine verb that waits for its step loop); returns the future of its result, to await
        on the caller's running loop. Cancelling that future cancels the coroutine."""
        async def run():
            return await make_coro()

        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self._loop))

    async def iterate(self, make_iter: Callable[[], Any]) -> AsyncIterator[Any]:
        """Yield the items of the async iterator `make_iter()`, created and advanced on the engine
        thread. Closing this generator early (a client went away) closes the engine's iterator."""
        it = None

        async def first() -> tuple[bool, Any]:  # created and first advanced in one hop
            nonlocal it
            it = make_iter().__aiter__()
            return await self._next(it)

        try:
            step = first()
            while True:
                done, item = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step, self._loop))
                if done:
                    return
                yield item
                step = self._next(it)
        finally:
            close = getattr(it, "aclose", None)
            if close is not None:
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close(), self._loop))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    @staticmethod
    async def _run(fn: Callable[..., T], args: tuple) -> T:
        return fn(*args)

    @staticmethod
    async def _next(it: Any) -> tuple[bool, Any]:
        try:
            return False, await it.__anext__()
        except StopAsyncIteration:
            return True, None
