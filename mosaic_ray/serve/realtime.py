"""RealtimeSession: one WebSocket connection to `/v1/realtime`, one live session on one stream.

The session reaches its stream exactly as the HTTP routes do (`StreamDirectory`: router once,
then the owning shard), so HTTP and WebSocket clients may use one stream at the same time, and a
stream outlives its sessions: a reconnect with the same `stream_id` resumes it (`session.created`
reports `last_seq`; the client resends only frames above it).

Two tasks per connection:
- the reader takes messages off the socket, refuses what is malformed or too large (an `error`
  event; the session goes on), answers `ping` and `response.cancel` at once, and queues the rest;
- the worker runs queued events one at a time in arrival order (`session.update`, frame appends,
  `commit`, text, `response.create`), so a question sees every frame appended before it and acks
  come back in seq order. A full queue stops the reader: TCP pushes back on the client.

Invariants:
- A frame append is acknowledged (`input_video_frame.appended`) only after the shard returned
  success for `append_frames`: acked frames are in the stream, whatever happens to the socket.
- Every refused client event gets exactly one `error` event naming its `event_id`; nothing a
  client sends closes the session except `session.close`, a disconnect or `idle_timeout_s`.
- At most one response runs at a time; `response.cancel` stops it (`response.done`, cancelled).
- Every `response.create` that starts an answer ends with one `response.done` carrying `status`,
  `finish_reason` and `usage` (`answer_end.py`: the same source and meaning as HTTP's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from mosaic_ray.engine.interface import UnknownStreamError
from mosaic_ray.bounds import STREAM_ID_PATTERN, is_stream_id
from mosaic_ray.serve.answer_end import cut_short, end_of, is_end
from mosaic_ray.serve.config import AppConfig
from mosaic_ray.serve.directory import StreamDirectory
from mosaic_ray.serve.errors import response_for
from mosaic_ray.serve.frames import FrameParser, ParsedBatch
from mosaic_ray.serve.realtime_events import (
    EventError,
    FrameAppend,
    ItemCreate,
    Ping,
    ResponseCancel,
    ResponseCreate,
    SessionClose,
    SessionUpdate,
    VideoCommit,
    error_event,
    parse_event,
    server_event,
)
from mosaic_ray.serve.limits import question_cost
from mosaic_ray.serve.schemas import check_question_length, engine_ask

# Question defaults a session keeps (session.update) and a response may override.
ASK_FIELDS = ("max_tokens", "temperature", "top_p", "stop", "seed")
STREAM_OPTIONS = ("pruning", "prune_threshold")
_STOP = object()  # queued by session.close: the worker drains what came before, then ends


class RealtimeSession:
    def __init__(self, ws: WebSocket, directory: StreamDirectory, parser: FrameParser, config: AppConfig,
                 charged: Callable[..., Any] | None = None,
                 ask: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        """`charged(caller, frames, nbytes)`: the ingress's tenant-rate context (HTTP's own);
        `ask(params)`: its question check (default `schemas.engine_ask` with this config's bound)."""
        self.ws, self.dir, self.parser, self.cfg = ws, directory, parser, config
        self.spec = config.ingress.realtime
        self.max_text_chars = config.ingress.max_text_chars
        self._charged = charged
        self._ask = ask or (lambda params: engine_ask(params, config.ingress.max_question_chars))
        self.id = f"sess_{uuid.uuid4().hex[:16]}"
        self.stream_id: str | None = None
        self.ask_defaults: dict[str, Any] = {}
        self.question: str | None = None  # the last user item, asked by the next response.create
        self.last_ts = 0.0  # the newest frame time this session appended (default time of text)
        self.pruned_seen = 0  # the stream's pruned-frame count at this session's last ack
        self._queue: asyncio.Queue = asyncio.Queue(self.spec.max_queued_events)
        self._send_lock = asyncio.Lock()
        self._response: asyncio.Task | None = None
        self._closed = False
        self.caller: Any = None  # auth.Caller, when the ingress authenticates

    @property
    def _hide_prefix(self) -> str | None:
        """The caller's tenant prefix, kept out of error messages (`errors.public_message`)."""
        return getattr(self.caller, "prefix", None)

    def _internal(self, stream_id: str) -> str:
        return self.caller.internal(stream_id) if self.caller is not None else stream_id

    def _external(self, stream_id: str) -> str:
        return self.caller.external(stream_id) if self.caller is not None else stream_id

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stream_id: str | None, identify: Callable[[], Any] | None = None) -> None:
        """Serve the connection until it closes. `identify` returns the caller (`auth.Caller`: its
        `internal` / `external` map the client's stream ids to the runtime's) or raises; a refused
        caller gets one `error` event and close code 1008."""
        await self.ws.accept()
        if identify is not None:
            try:
                self.caller = identify()
            except Exception as exc:
                await self._send_error(exc, None)
                await self._close(1008, "unauthorized")
                return
        if stream_id is not None:
            try:
                if not is_stream_id(stream_id):
                    raise EventError("invalid_request", f"stream_id must match {STREAM_ID_PATTERN}")
                await self._attach(stream_id)
            except Exception as exc:  # the session opens without a stream; the client may fix it
                await self._send_error(exc, None)
        await self._send(server_event("session.created", session=await self._describe()))
        worker = asyncio.create_task(self._work())
        beat = asyncio.create_task(self._heartbeat())
        try:
            await self._read(worker)
        finally:
            beat.cancel()
            if self._response is not None:
                self._response.cancel()
            if not worker.done():
                worker.cancel()
            await asyncio.gather(worker, beat, return_exceptions=True)
            await self._close(1000)

    async def _read(self, worker: asyncio.Task) -> None:
        while not worker.done():
            receive = asyncio.ensure_future(self.ws.receive())
            done, _ = await asyncio.wait({receive, worker}, timeout=self.spec.idle_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                if not done:  # nothing received for idle_timeout_s
                    await self._close(1001, "idle timeout")
                return
            msg = receive.result()
            if msg["type"] == "websocket.disconnect":
                return
            try:
                event = self._decode(msg)
                if isinstance(event, Ping):
                    await self._send(server_event("pong", ping_id=event.event_id))
                elif isinstance(event, ResponseCancel):
                    await self._cancel(event)
                else:
                    await self._queue.put(event)
                    if isinstance(event, SessionClose):
                        await self._queue.put(_STOP)
            except EventError as exc:
                await self._send(error_event(exc.code, exc.message, exc.event_id))

    def _decode(self, msg: dict) -> Any:
        """A validated client event, or a `ParsedBatch` for a binary message (msgpack frames)."""
        data, text = msg.get("bytes"), msg.get("text")
        size = len(data) if data is not None else len((text or "").encode("utf-8", "surrogatepass"))
        if size > self.spec.max_message_bytes:
            raise EventError("message_too_large",
                             f"message of {size} bytes exceeds ingress.realtime.max_message_bytes={self.spec.max_message_bytes}")
        if data is not None:
            try:
                return self.parser.parse_msgpack(data)
            except Exception as exc:
                body = json.loads(response_for(exc, self._hide_prefix).body)["error"]
                raise EventError(body["code"], body["message"]) from None
        return parse_event(text or "")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.spec.heartbeat_s)
            await self._send(server_event("heartbeat", ts=time.time()))

    # ------------------------------------------------------------------ the ordered worker
    async def _work(self) -> None:
        handlers = {SessionUpdate: self._session_update, FrameAppend: self._append_event,
                    ParsedBatch: self._append_batch, VideoCommit: self._commit, ItemCreate: self._item,
                    ResponseCreate: self._respond}
        while True:
            event = await self._queue.get()
            if event is _STOP:
                await self._send(server_event("session.closed", session_id=self.id))
                return
            if isinstance(event, SessionClose):
                continue
            try:
                await handlers[type(event)](event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._send_error(exc, getattr(event, "event_id", None))

    async def _session_update(self, ev: SessionUpdate) -> None:
        opts = ev.session
        if opts.stream_id is not None and opts.new_stream:
            raise EventError("invalid_request", "give stream_id or new_stream, not both", ev.event_id)
        if opts.new_stream:
            tenant = getattr(self.caller, "tenant", None)
            self._set_stream(self._external(await self._create(self._internal(f"rt-{uuid.uuid4().hex[:12]}")
                                                                if tenant else None)))
        elif opts.stream_id is not None and opts.stream_id != self.stream_id:
            await self._attach(opts.stream_id)
        stream_opts = {k: getattr(opts, k) for k in STREAM_OPTIONS if getattr(opts, k) is not None}
        if stream_opts:
            await self.dir.call(self._need_stream(ev), "configure_stream", stream_opts)
        self.ask_defaults.update({k: getattr(opts, k) for k in ASK_FIELDS if getattr(opts, k) is not None})
        await self._send(server_event("session.updated", session=await self._describe()))

    async def _append_event(self, ev: FrameAppend) -> None:
        self._need_stream(ev)
        data, ctype = ev.image_bytes()
        await self._append(self.parser.parse_image(data, ctype, ev.ts, ev.seq), ev.event_id)

    async def _append_batch(self, batch: ParsedBatch) -> None:
        self._need_stream(None)
        await self._append(batch, None)

    async def _append(self, batch: ParsedBatch, event_id: str | None) -> None:
        sid = self._need_stream(None)
        async with self._charge(len(batch.frames), sum(len(f.data) for f in batch.frames)):
            ack = await self.dir.call(sid, "append_frames", batch.seq, batch.frames, batch.timestamps)
        self.last_ts = max(self.last_ts, max(batch.timestamps))
        total = ack.get("frames_pruned")
        pruned = None
        if total is not None:
            # Exact when this session is the stream's only writer; with concurrent writers (HTTP),
            # frames they had pruned since this session's last ack are counted here too.
            pruned = 0 if ack.get("duplicate") else max(0, min(ack["frames_added"], total - self.pruned_seen))
            self.pruned_seen = total
        await self._send(server_event(
            "input_video_frame.appended", ack_for=event_id, stream_id=self.stream_id, seq=ack["seq"],
            ts=batch.timestamps, frames_added=ack["frames_added"], duplicate=ack["duplicate"],
            frames_total=ack.get("frames_total"), pruned=pruned, frames_pruned=total))

    async def _commit(self, ev: VideoCommit) -> None:
        info = await self.dir.call(self._need_stream(ev), "stream_info")
        await self._send(server_event("input_video_buffer.committed", ack_for=ev.event_id, stream_id=self.stream_id,
                                      last_seq=info["last_seq"], frames=info.get("frames")))

    async def _item(self, ev: ItemCreate) -> None:
        text = ev.item.text()
        if len(text) > self.max_text_chars:
            raise EventError("invalid_request", f"text is limited to {self.max_text_chars} characters", ev.event_id)
        if ev.item.role == "user":  # the next response's question: refused now rather than then
            check_question_length(text, self.cfg.ingress.max_question_chars)
        if ev.item.role == "system":
            sid = self._need_stream(ev)
            async with self._charge(0, len(text.encode("utf-8", "surrogatepass"))):
                await self.dir.call(sid, "append_text", text, self.last_ts if ev.ts is None else ev.ts)
        else:
            self.question = text
        await self._send(server_event("conversation.item.created", ack_for=ev.event_id,
                                      item={"id": f"item_{uuid.uuid4().hex[:12]}", **ev.item.model_dump()}))

    async def _respond(self, ev: ResponseCreate) -> None:
        """Answer the question (`_answer`); the worker waits for it."""
        self._need_stream(ev)
        r = ev.response
        question = r.question or r.instructions or self.question
        if question is None:
            raise EventError("no_question", "response.create needs a question: send a user "
                             "conversation.item.create first, or response.question", ev.event_id)
        params = self._ask({"question": question, **self.ask_defaults,
                            **{k: v for k, v in r.model_dump(include={*ASK_FIELDS, "since", "until"}).items()
                               if v is not None}})
        async with self._charge(0, 0, question_cost(params)):  # the tenant's question tokens/s (429 when over)
            pass
        await self._answer(f"resp_{uuid.uuid4().hex[:12]}", params, ev.event_id)
        self.question = None if r.question is None and r.instructions is None else self.question

    async def _answer(self, rid: str, params: dict, event_id: str | None) -> None:
        """The deltas come from a task of their own (`response.cancel` cancels it); `response.done`
        then says how the answer ended: `finish_reason` and `usage` are the engine's end item
        (`answer_end.end_of`, as HTTP's), or `cut_short` ("cancelled", "error") when none came."""
        start = time.perf_counter()
        await self._send(server_event("response.created", ack_for=event_id, response={"id": rid, "status": "in_progress"}))
        got: dict[str, Any] = {"parts": [], "ttft": None, "end": None}
        self._response = asyncio.create_task(self._deltas(rid, params, start, got))
        await asyncio.wait({self._response})  # unlike awaiting it, a cancelled answer is no error here
        task, self._response = self._response, None
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            status, end = "failed", cut_short("error")
            await self._send_error(exc, event_id)
        elif got["end"] is None and task.cancelled():
            status, end = "cancelled", cut_short("cancelled")
        else:  # a cancel that came after the engine's end changes nothing: the answer is whole
            status, end = "completed", end_of(got["end"])
        text, ttft = "".join(got["parts"]), got["ttft"]
        if status == "completed":
            await self._send(server_event("response.output_text.done", response_id=rid, text=text))
        await self._send(server_event("response.done", response={
            "id": rid, "status": status, "output_text": text, "deltas": len(got["parts"]), **end,
            "ttft_ms": None if ttft is None else ttft * 1e3, "latency_ms": (time.perf_counter() - start) * 1e3}))

    async def _deltas(self, rid: str, params: dict, start: float, got: dict[str, Any]) -> None:
        """Send each text delta as it comes; keep them, the first one's time and the shard's end item in `got`."""
        async for item in self.dir.stream(self._need_stream(None), "ask", params, True):  # with_end
            if is_end(item):
                got["end"] = item
                continue
            got["ttft"] = got["ttft"] if got["ttft"] is not None else time.perf_counter() - start
            got["parts"].append(item)
            await self._send(server_event("response.output_text.delta", response_id=rid, delta=item))

    async def _cancel(self, ev: ResponseCancel) -> None:
        if self._response is None or self._response.done():
            raise EventError("no_response", "no response is in progress", ev.event_id)
        self._response.cancel()

    # ------------------------------------------------------------------ streams
    async def _attach(self, stream_id: str) -> None:
        """Use `stream_id`, creating it when it does not exist (a resume when it does)."""
        try:
            info = await self.dir.call(self._internal(stream_id), "stream_info")
        except UnknownStreamError:
            await self._create(self._internal(stream_id))
            info = {}
        self._set_stream(stream_id, info)

    async def _create(self, internal_id: str | None) -> str:
        """Open a stream as `POST /v1/streams` does, the tenant's stream quota included."""
        quota = None
        tenant = getattr(self.caller, "tenant", None)
        if tenant is not None:
            limits = self.cfg.auth.limits_of(tenant)
            if limits.max_streams is not None:
                quota = (self.caller.prefix, limits.max_streams, limits.streams_retry_after_s)
        return (await self.dir.ask_router("create_stream", internal_id, None, quota))["id"]

    def _charge(self, frames: int, nbytes: int, question_tokens: int = 0) -> Any:
        """The tenant's frame, byte and question-token rates, charged as HTTP charges them (429 when over)."""
        if self._charged is None or self.caller is None:
            return contextlib.nullcontext()
        return self._charged(self.caller, frames, nbytes, question_tokens)

    def _set_stream(self, stream_id: str, info: dict | None = None) -> None:
        info = info or {}
        self.stream_id = stream_id
        self.last_ts = float(info.get("duration_s") or 0.0)
        self.pruned_seen = int(info.get("frames_pruned") or 0)

    def _need_stream(self, ev: Any) -> str:
        """The runtime's id of the session's stream (`stream_id` is the client's name for it)."""
        if self.stream_id is None:
            raise EventError("no_stream", "this session has no stream yet: send session.update "
                             "with stream_id or new_stream first", getattr(ev, "event_id", None))
        return self._internal(self.stream_id)

    async def _describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "stream_id": self.stream_id, **self.ask_defaults, **self.spec.model_dump()}
        if self.stream_id is not None:
            info = await self.dir.call(self._need_stream(None), "stream_info")
            out.update({"last_seq": info.get("last_seq"), "frames": info.get("frames"),
                        "duration_s": info.get("duration_s"), "shard": info.get("shard"),
                        **{k: info[k] for k in ("frames_pruned", *STREAM_OPTIONS) if k in info}})
        return out

    # ------------------------------------------------------------------ sending
    async def _send(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps(event))
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._closed = True

    async def _send_error(self, exc: BaseException, event_id: str | None) -> None:
        if isinstance(exc, EventError):
            await self._send(error_event(exc.code, exc.message, exc.event_id or event_id))
            return
        response = response_for(exc, self._hide_prefix)
        body = json.loads(response.body)["error"]
        await self._send(error_event(body["code"], body["message"], event_id, response.status_code))

    async def _close(self, code: int, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code, reason)
