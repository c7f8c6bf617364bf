"""Python clients of the HTTP API: `AsyncMosaicClient` (asyncio) and `MosaicClient` (blocking).

    async with AsyncMosaicClient("http://127.0.0.1:8000") as c:
        sid = await c.create_stream()
        await c.push_video(sid, "clip.mp4", fps=2)          # JPEG-encoded, batched, paced if asked
        print(await c.ask(sid, "What happened?"))
        async for delta in c.ask_stream(sid, "And then?"):
            print(delta, end="")

Guarantees:
- Frames are never duplicated: every batch carries a seq (continuing from the stream's
  `last_seq` on the server), and a retried batch reuses its seq, which the server acknowledges
  without appending again.
- Backpressure is honoured: 503/429 are retried after the server's Retry-After (`retry.py`, run
  by tenacity).
- A question is never sent twice once it may have reached the server.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from httpx_sse import EventSource, aconnect_sse
from tenacity import RetryCallState
from tqdm.auto import tqdm

from mosaic_ray.bounds import check_stream_id
from mosaic_ray.client.encoding import MSGPACK_TYPE, encode_batch
from mosaic_ray.client.errors import MosaicAPIError
from mosaic_ray.client.retry import RetryPolicy
from mosaic_ray.client.sources import frames_from, is_live


def _stream_path(stream_id: str, tail: str = "") -> str:
    """`/v1/streams/<id><tail>`; an id outside the server's grammar (`mosaic_ray.bounds`: a newline, a
    '/', a control character) is a `ValueError` here, before any request is made."""
    return f"/v1/streams/{check_stream_id(stream_id)}{tail}"


@dataclass(slots=True)
class PushResult:
    stream_id: str
    frames: int
    batches: int
    seconds: float
    last_seq: int

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class AsyncMosaicClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        jpeg_quality: int = 85,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout_s, headers=headers, transport=transport)
        self.retry = retry or RetryPolicy()
        self.jpeg_quality = jpeg_quality
        self.retries = 0  # attempts repeated, over the client's life
        self._next_seq: dict[str, int] = {}

    async def __aenter__(self) -> AsyncMosaicClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ streams
    async def create_stream(self, stream_id: str | None = None) -> str:
        """Create a stream (id chosen here when not given, so a retried create stays one stream)."""
        sid = check_stream_id(stream_id) if stream_id else f"s-{uuid.uuid4().hex[:16]}"
        await self._request("POST", "/v1/streams", json={"id": sid}, idempotent=True, ok_after_retry={409})
        self._next_seq[sid] = 0
        return sid

    async def list_streams(self) -> list[dict[str, str]]:
        return (await self._request("GET", "/v1/streams", idempotent=True)).json()["streams"]

    async def stream_info(self, stream_id: str) -> dict[str, Any]:
        return (await self._request("GET", _stream_path(stream_id), idempotent=True)).json()

    async def delete_stream(self, stream_id: str) -> None:
        await self._request("DELETE", _stream_path(stream_id), idempotent=True, ok_after_retry={404})
        self._next_seq.pop(stream_id, None)

    async def health(self) -> dict[str, Any]:
        return (await self._request("GET", "/health", idempotent=True)).json()

    # ------------------------------------------------------------------ ingest
    async def push_frames(
        self, stream_id: str, frames: Sequence[np.ndarray], timestamps: Sequence[float], seq: int | None = None
    ) -> dict[str, Any]:
        """Send one batch (RGB uint8 frames, JPEG-encoded here); returns the server's ack."""
        if seq is None:
            seq = await self._seq_for(stream_id)
        body = await asyncio.to_thread(encode_batch, seq, frames, timestamps, self.jpeg_quality)
        resp = await self._request(
            "POST", _stream_path(stream_id, "/frames"), content=body, headers={"content-type": MSGPACK_TYPE},
            idempotent=True,
        )
        ack = resp.json()
        self._next_seq[stream_id] = max(self._next_seq.get(stream_id, 0), ack["seq"] + 1)
        return ack

    async def push_text(self, stream_id: str, text: str, ts: float) -> None:
        await self._request("POST", _stream_path(stream_id, "/text"), json={"text": text, "ts": ts}, idempotent=False)

    async def push_video(
        self,
        stream_id: str,
        source: str | Path,
        *,
        fps: float | None = 1.0,
        size: int | tuple[int, int] | None = None,
        max_frames: int | None = None,
        batch_frames: int = 8,
        realtime: bool = False,
        progress: bool = True,
        position: int = 0,
    ) -> PushResult:
        """Decode `source` (file, camera, URL), sample at `fps`, push in batches of `batch_frames`.
        `realtime` paces a file at its own clock (as a live camera would send it)."""
        frames = await asyncio.to_thread(frames_from, source, fps, size, max_frames)
        pace = realtime and not is_live(source)
        bar = tqdm(desc=stream_id, unit="frame", total=max_frames, position=position, disable=not progress, leave=True)
        start, sent, batches, batch = time.perf_counter(), 0, 0, []
        try:
            while True:
                vf = await asyncio.to_thread(next, frames, None)
                if vf is not None:
                    if pace:
                        await asyncio.sleep(max(0.0, start + vf.ts - time.perf_counter()))
                    batch.append(vf)
                if batch and (vf is None or len(batch) >= batch_frames):
                    await self.push_frames(stream_id, [f.rgb for f in batch], [f.ts for f in batch])
                    sent, batches = sent + len(batch), batches + 1
                    bar.update(len(batch))
                    batch = []
                if vf is None:
                    break
        finally:
            bar.close()
        return PushResult(stream_id, sent, batches, time.perf_counter() - start, self._next_seq.get(stream_id, 0) - 1)

    async def push_videos(self, sources: dict[str, str | Path], **kwargs: Any) -> dict[str, PushResult]:
        """Push several streams at once, one progress bar each."""
        results = await asyncio.gather(
            *(self.push_video(sid, src, position=i, **kwargs) for i, (sid, src) in enumerate(sources.items()))
        )
        return {r.stream_id: r for r in results}

    # ------------------------------------------------------------------ questions
    async def ask(self, stream_id: str, question: str, **params: Any) -> str:
        """The whole answer (params: max_tokens, since, until, temperature, top_p, stop, seed)."""
        body = {"question": question, "stream": False, **params}
        resp = await self._request("POST", _stream_path(stream_id, "/query"), json=body, idempotent=False)
        return resp.json()["answer"]

    async def ask_stream(self, stream_id: str, question: str, **params: Any) -> AsyncIterator[str]:
        """The answer's text deltas as the server streams them (server-sent events, read by httpx-sse's
        `aconnect_sse`: it sends `Accept: text/event-stream` and parses the events). Opening the
        stream is retried as `ask` is; once events flow, nothing is."""
        body = {"question": question, "stream": True, **params}
        async with AsyncExitStack() as opened:
            async def open_events() -> httpx.Response:
                await opened.aclose()  # the refused attempt before this one
                sse = await opened.enter_async_context(
                    aconnect_sse(self._http, "POST", _stream_path(stream_id, "/query"), json=body))
                if sse.response.status_code >= 400:
                    await sse.response.aread()
                return sse.response

            resp = await self.retry.retrying(False, self._count_retry)(open_events)
            if resp.status_code >= 400:
                raise _api_error(resp)
            async for event in EventSource(resp).aiter_sse():
                if event.event == "error":
                    err = event.json().get("error", {})
                    raise MosaicAPIError(500, err.get("code", "error"), err.get("message", ""))
                if event.event == "done":
                    return
                yield event.json()["delta"]

    # ------------------------------------------------------------------ internals
    async def _seq_for(self, stream_id: str) -> int:
        if stream_id not in self._next_seq:
            self._next_seq[stream_id] = (await self.stream_info(stream_id))["last_seq"] + 1
        return self._next_seq[stream_id]

    async def _request(
        self, method: str, path: str, *, idempotent: bool, ok_after_retry: frozenset[int] | set[int] = frozenset(),
        **kwargs: Any,
    ) -> httpx.Response:
        """One request, tried again as `retry.py` says; an error status after the last try is a
        `MosaicAPIError`, except one of `ok_after_retry` once the request was retried (a create
        whose first try landed: 409; a delete: 404)."""
        tries = 0

        async def send() -> httpx.Response:
            nonlocal tries
            tries += 1
            return await self._http.request(method, path, **kwargs)

        resp = await self.retry.retrying(idempotent, self._count_retry)(send)
        if resp.status_code < 400 or (tries > 1 and resp.status_code in ok_after_retry):
            return resp
        raise _api_error(resp)

    def _count_retry(self, _state: RetryCallState) -> None:
        self.retries += 1


def _api_error(resp: httpx.Response) -> MosaicAPIError:
    try:
        err = resp.json()["error"]
        return MosaicAPIError(resp.status_code, err["code"], err["message"])
    except Exception:
        return MosaicAPIError(resp.status_code, "http_error", resp.text[:200])


class MosaicClient:
    """The blocking twin of `AsyncMosaicClient`: same methods and arguments. It runs an async
    client on a private event-loop thread, so it also works inside notebooks and other loops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mosaic-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncMosaicClient:
            return AsyncMosaicClient(*args, **kwargs)

        self.aio = self._run(make())

    def __enter__(self) -> MosaicClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._run(self.aio.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def create_stream(self, stream_id: str | None = None) -> str:
        return self._run(self.aio.create_stream(stream_id))

    def list_streams(self) -> list[dict[str, str]]:
        return self._run(self.aio.list_streams())

    def stream_info(self, stream_id: str) -> dict[str, Any]:
        return self._run(self.aio.stream_info(stream_id))

    def delete_stream(self, stream_id: str) -> None:
        self._run(self.aio.delete_stream(stream_id))

    def health(self) -> dict[str, Any]:
        return self._run(self.aio.health())

    def push_frames(self, stream_id: str, frames: Sequence[np.ndarray], timestamps: Sequence[float],
                    seq: int | None = None) -> dict[str, Any]:
        return self._run(self.aio.push_frames(stream_id, frames, timestamps, seq))

    def push_text(self, stream_id: str, text: str, ts: float) -> None:
        self._run(self.aio.push_text(stream_id, text, ts))

    def push_video(self, stream_id: str, source: str | Path, **kwargs: Any) -> PushResult:
        return self._run(self.aio.push_video(stream_id, source, **kwargs))

    def push_videos(self, sources: dict[str, str | Path], **kwargs: Any) -> dict[str, PushResult]:
        return self._run(self.aio.push_videos(sources, **kwargs))

    def ask(self, stream_id: str, question: str, **params: Any) -> str:
        return self._run(self.aio.ask(stream_id, question, **params))

    def ask_stream(self, stream_id: str, question: str, **params: Any) -> Iterator[str]:
        deltas = self.aio.ask_stream(stream_id, question, **params)
        try:
            while True:
                try:
                    yield self._run(deltas.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(deltas.aclose())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
