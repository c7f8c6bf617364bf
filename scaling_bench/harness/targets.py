"""Where the load generator sends a stream's frames and questions: the Serve HTTP API (through
`AsyncMosaicClient`) or the shard actors directly (through the router's `StreamDirectory`)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mosaic_ray.client import AsyncMosaicClient
from mosaic_ray.client.retry import RetryPolicy


class HttpTarget:
    name = "http"

    def __init__(self, url: str) -> None:
        self.url = url
        self._c: AsyncMosaicClient | None = None

    async def __aenter__(self) -> HttpTarget:
        self._c = AsyncMosaicClient(self.url, timeout_s=300, retry=RetryPolicy())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._c.aclose()

    async def create(self, sid: str) -> None:
        await self._c.create_stream(sid)

    async def push(self, sid: str, seq: int, frames: list[np.ndarray], ts: list[float]) -> None:
        await self._c.push_frames(sid, frames, ts, seq)

    async def ask(self, sid: str, question: str, max_tokens: int) -> tuple[float, float]:
        """(time to first delta, time to the whole answer), as the client sees them."""
        t0 = time.perf_counter()
        first = None
        async for _ in self._c.ask_stream(sid, question, max_tokens=max_tokens):
            first = first if first is not None else time.perf_counter() - t0
        end = time.perf_counter() - t0
        return (first if first is not None else end), end

    async def delete(self, sid: str) -> None:
        await self._c.delete_stream(sid)


class DirectTarget:
    """Ray actor calls only: no HTTP, no JPEG (RGB arrays go to the shard as they are)."""

    name = "direct"

    def __init__(self, runtime_cfg: dict[str, Any]) -> None:
        self.cfg = runtime_cfg
        self._d = None

    async def __aenter__(self) -> DirectTarget:
        from mosaic_ray.runtime.config import RuntimeConfig
        from mosaic_ray.serve.directory import StreamDirectory

        self._d = await StreamDirectory.connect(RuntimeConfig(**self.cfg))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def create(self, sid: str) -> None:
        await self._d.ask_router("create_stream", sid)

    async def push(self, sid: str, seq: int, frames: list[np.ndarray], ts: list[float]) -> None:
        await self._d.call(sid, "append_frames", seq, frames, ts)

    async def ask(self, sid: str, question: str, max_tokens: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        first = None
        async for _ in self._d.stream(sid, "ask", {"question": question, "max_tokens": max_tokens}):
            first = first if first is not None else time.perf_counter() - t0
        end = time.perf_counter() - t0
        return (first if first is not None else end), end

    async def delete(self, sid: str) -> None:
        await self._d.ask_router("delete_stream", sid)
        self._d.forget(sid)


class EngineTarget:
    """A `StreamEngine` in this process, driven as a shard drives it (`ingest_frames`, `ask`) on the
    caller's event loop: no Ray, no HTTP; what the engine's step loop alone sustains."""

    name = "engine"

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def __aenter__(self) -> EngineTarget:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def create(self, sid: str) -> None:
        self.engine.open_stream(sid)

    async def push(self, sid: str, seq: int, frames: list[np.ndarray], ts: list[float]) -> None:
        await self.engine.ingest_frames(sid, frames, ts)

    async def ask(self, sid: str, question: str, max_tokens: int) -> tuple[float, float]:
        from mosaic_ray.engine.interface import AskRequest

        t0 = time.perf_counter()
        first = None
        async for _ in self.engine.ask(sid, AskRequest(question, max_tokens=max_tokens)):
            first = first if first is not None else time.perf_counter() - t0
        end = time.perf_counter() - t0
        return (first if first is not None else end), end

    async def delete(self, sid: str) -> None:
        self.engine.close_stream(sid)
