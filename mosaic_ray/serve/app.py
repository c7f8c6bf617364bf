"""The Ray Serve application: a FastAPI ingress over the runtime (router + shard actors).

Routes (all JSON unless said; errors are `{"error": {"code", "message"}}`, see `errors.py`):

    POST   /v1/streams                   {"id"?} -> 201 {"id", "shard"}
    GET    /v1/streams                   -> {"streams": [{"id", "shard"}]}
    GET    /v1/streams/{id}              -> the stream's info (frames, last_seq, kv bytes, ...)
    DELETE /v1/streams/{id}              -> {"id", "deleted"}
    POST   /v1/streams/{id}/frames       msgpack batch, or one image/jpeg|png body (?ts=&seq=)
                                         -> {"stream_id", "seq", "frames_added", "duplicate", ...}
    POST   /v1/streams/{id}/text         {"text", "ts"}
    POST   /v1/streams/{id}/query        {"question", "max_tokens", "stream", "since", "until", ...}
                                         -> {"answer", ...} or server-sent events when stream=true
    POST   /v1/chat/completions          OpenAI-compatible (`openai_compat.py`, `openai_routes.py`)
    POST   /v1/completions               OpenAI's legacy completions: `prompt` is the question
    GET    /v1/models[/{id}]             the caller's streams as OpenAI models
    GET    /health                       200 when every shard is healthy, else 503
    GET    /metrics                      Prometheus text, every shard
    WS     /v1/realtime[?stream_id=]     one realtime session per connection (`realtime.py`, docs/realtime.md)

Every route but /health needs an API key once keys are configured (`auth.py`); a tenant names its
streams by its own ids (`tenant:id` inside the runtime), /metrics needs the admin key, and frames
and text count against the tenant's rates (`limits.py`). Every body is bounded (`body_limit.py`).

A replica resolves a stream's shard once through the router and then calls the shard actor
directly (`StreamDirectory`). Frame bodies are parsed and checked here (format, size, limits), then
forwarded still compressed: the shard decodes them (`runtime/durability/frame_codec.py`). A streamed answer's
status is decided by its first delta: errors before it are proper 4xx/5xx responses, errors after
it are an SSE `error` event.
"""


import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi import WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve

from mosaic_ray.engine.interface import InvalidInputError, UnknownStreamError
from mosaic_ray.bounds import is_stream_id
from mosaic_ray.runtime.placement.router import new_stream_id
from mosaic_ray.serve import sse
from mosaic_ray.serve.answer_end import end_of, is_end
from mosaic_ray.serve.auth import Authenticator, Caller, presented_key, presented_ws_key
from mosaic_ray.serve.body_limit import BodyLimit
from mosaic_ray.serve.config import AppConfig, IngressSpec
from mosaic_ray.serve.directory import StreamDirectory
from mosaic_ray.serve.errors import (
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    install_error_handlers,
    response_for,
)
from mosaic_ray.serve.frames import IMAGE_TYPES, MSGPACK_TYPES, FrameParser
from mosaic_ray.serve.frames import OPENAPI_BODY as FRAMES_OPENAPI_BODY
from mosaic_ray.serve.lifetime import release_with_app
from mosaic_ray.serve.limits import TenantLimiter, question_cost
from mosaic_ray.serve.metrics import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE, render
from mosaic_ray.serve.openai_compat import ChatCompletionRequest, CompletionRequest
from mosaic_ray.serve.openai_routes import OpenAIRoutes
from mosaic_ray.serve.realtime import RealtimeSession
from mosaic_ray.serve.schemas import (
    MAX_SEQ,
    MAX_TIME_S,
    STREAM_ID_PATTERN,
    CreateStreamRequest,
    Deleted,
    FrameAck,
    Health,
    QueryAnswer,
    QueryIn,
    StreamInfo,
    StreamList,
    StreamRef,
    TextAck,
    TextIn,
    engine_ask,
)

# No trailing-slash redirects: Starlette builds their absolute URL from the Host header, so any
# client could make the service redirect to a host of its choosing. `/v1/streams/` is a 404.
api = FastAPI(title="mosaic_ray", description="Questions about live video streams, answered by a VLM.",
              redirect_slashes=False)
install_error_handlers(api)

StreamId = Path(pattern=STREAM_ID_PATTERN, description="stream id")


def _replica() -> "MosaicIngress":
    """This replica's ingress object (Serve serves a frozen copy of `api`: its state is not ours)."""
    return serve.get_replica_context().servable_object


def _body_limit() -> int:
    try:
        return _replica()._cfg.ingress.max_body_bytes
    except Exception:  # not a replica, or not constructed yet: the default limit
        return IngressSpec().max_body_bytes


def _body_timeouts() -> tuple[float, float]:
    try:
        ing = _replica()._cfg.ingress
    except Exception:  # not a replica, or not constructed yet: the default limits
        ing = IngressSpec()
    return ing.body_idle_timeout_s, ing.body_timeout_s


api.add_middleware(BodyLimit, limit=_body_limit, timeouts=_body_timeouts)


async def _caller(request: Request, key: str | None = Depends(presented_key)) -> Caller:
    """The authenticated caller (401 without a valid key, once keys are configured); kept on the
    request so that error bodies can drop its tenant prefix (`errors.caller_prefix`)."""
    who = _replica().auth.identify(key)
    request.state.caller = who
    return who


async def _json_caller(request: Request, key: str | None = Depends(presented_key)) -> Caller:
    """`_caller`, then a JSON body's content type (415 otherwise): a refused key comes first."""
    who = await _caller(request, key)
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaTypeError(f"this route takes application/json, not {media or 'unspecified'!r}")
    return who


async def _admin(request: Request, key: str | None = Depends(presented_key)) -> Caller:
    who = await _caller(request, key)
    who.require_admin()
    return who


Who = Depends(_caller)
WhoJson = Depends(_json_caller)


def _error_json(exc: BaseException, hide_prefix: str | None = None) -> dict[str, Any]:
    """The error body for a failure after a streamed answer has begun (the status is sent)."""
    return json.loads(response_for(exc, hide_prefix).body)


@serve.deployment(name="MosaicIngress")
@serve.ingress(api)
class MosaicIngress:
    async def __init__(self, config: dict[str, Any]) -> None:
        self._cfg = AppConfig(**config)
        self._dir = await StreamDirectory.connect(self._cfg.runtime)
        limits = self._cfg.ingress
        self._parser = FrameParser(limits.max_frames_per_batch, limits.max_frame_pixels, limits.max_body_bytes)
        self.auth = Authenticator(self._cfg.auth)
        self._limiter = TenantLimiter(self._cfg.auth, share=1.0 / limits.num_replicas)
        self._openai = OpenAIRoutes(self)

    async def __del__(self) -> None:
        """Serve's replica teardown: the runtime goes with the application (`lifetime.py`)."""
        if hasattr(self, "_cfg"):
            await release_with_app(self._cfg.runtime, serve.get_replica_context().app_name)

    async def check_health(self) -> None:
        """Serve's replica probe: the router must answer (shard health is /health's business)."""
        await asyncio.wait_for(self._dir.ask_router("shards"), timeout=10)

    # ------------------------------------------------------------------ streams
    @api.post("/v1/streams", status_code=201, response_model=StreamRef)
    async def create_stream(self, who: Caller = WhoJson, body: CreateStreamRequest | None = None) -> dict:
        sid = body.id if body and body.id else (new_stream_id() if who.tenant else None)
        quota = None
        if who.tenant is not None:
            limits = self._cfg.auth.limits_of(who.tenant)
            if limits.max_streams is not None:
                quota = (who.prefix, limits.max_streams, limits.streams_retry_after_s)
        ref = await self._dir.ask_router("create_stream", None if sid is None else who.internal(sid), None, quota)
        if body and body.stream_options():  # refused options leave no stream behind
            try:
                await self._dir.call(ref["id"], "configure_stream", body.stream_options())
            except Exception:
                await self._dir.ask_router("delete_stream", ref["id"])
                raise
        return {"id": who.external(ref["id"]), "shard": ref["shard"]}

    @api.get("/v1/streams", response_model=StreamList)
    async def list_streams(self, who: Caller = Who) -> dict:
        streams = await self._dir.ask_router("list_streams")
        return {"streams": [{"id": who.external(sid), "shard": shard}
                            for sid, shard in streams.items() if who.owns(sid)]}

    @api.get("/v1/streams/{stream_id}", response_model=StreamInfo)
    async def get_stream(self, who: Caller = Who, stream_id: str = StreamId) -> dict:
        return {**await self._dir.call(self._sid(who, stream_id), "stream_info"), "id": stream_id}

    @api.delete("/v1/streams/{stream_id}", response_model=Deleted)
    async def delete_stream(self, who: Caller = Who, stream_id: str = StreamId) -> dict:
        sid = self._sid(who, stream_id)
        await self._dir.ask_router("delete_stream", sid)
        self._dir.forget(sid)
        return {"id": stream_id, "deleted": True}

    # ------------------------------------------------------------------ ingest
    @api.post("/v1/streams/{stream_id}/frames", response_model=FrameAck, openapi_extra=FRAMES_OPENAPI_BODY)
    async def append_frames(
        self,
        request: Request,
        who: Caller = Who,
        stream_id: str = StreamId,
        ts: float | None = Query(None, ge=0, le=MAX_TIME_S, allow_inf_nan=False, description="timestamp of an image body"),
        seq: int | None = Query(None, ge=0, le=MAX_SEQ, description="seq of an image body"),
    ) -> dict:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in MSGPACK_TYPES and ctype not in IMAGE_TYPES:
            raise UnsupportedMediaTypeError(
                f"frames are application/msgpack, image/jpeg or image/png, not {ctype or 'unspecified'!r}"
            )
        body = await self._read_body(request)
        if ctype in MSGPACK_TYPES:
            batch = await asyncio.to_thread(self._parser.parse_msgpack, body)
        elif ts is None:
            raise InvalidInputError("an image body needs the ts query parameter")
        else:
            batch = self._parser.parse_image(body, ctype, ts, seq)
        async with self._charged(who, len(batch.frames), len(body)):
            ack = await self._dir.call(self._sid(who, stream_id), "append_frames", batch.seq, batch.frames,
                                       batch.timestamps)
        return {**ack, "stream_id": stream_id}

    @api.post("/v1/streams/{stream_id}/text", response_model=TextAck)
    async def append_text(self, body: TextIn, who: Caller = WhoJson, stream_id: str = StreamId) -> dict:
        if len(body.text) > self._cfg.ingress.max_text_chars:
            raise InvalidInputError(f"text is limited to {self._cfg.ingress.max_text_chars} characters")
        async with self._charged(who, 0, len(body.text.encode("utf-8", "surrogatepass"))):
            await self._dir.call(self._sid(who, stream_id), "append_text", body.text, body.ts)
        return {"stream_id": stream_id}

    # ------------------------------------------------------------------ questions
    @api.post("/v1/streams/{stream_id}/query", response_model=QueryAnswer)
    async def query(self, body: QueryIn, who: Caller = WhoJson, stream_id: str = StreamId) -> Any:
        start = time.perf_counter()
        sid = self._sid(who, stream_id)
        params = self._ask(body.ask_params())
        async with self._charged(who, 0, 0, question_cost(params)):
            if body.stream:
                deltas, ttft = await self._start_answer(sid, params, with_end=True)
                return sse.response(self._query_events(deltas, start, ttft, who.prefix))
            out = await self._dir.call(sid, "answer", params)
        return {"stream_id": stream_id, "answer": out["text"], "deltas": out["deltas"],
                "ttft_ms": out["ttft_s"] * 1e3, "latency_ms": (time.perf_counter() - start) * 1e3,
                **end_of(out)}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, who: Caller = WhoJson) -> Any:
        return await self._openai.chat(body, who)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, who: Caller = WhoJson) -> Any:
        return await self._openai.complete(body, who)

    @api.get("/v1/models")
    async def models(self, who: Caller = Who) -> dict:
        return await self._openai.models(who)

    @api.get("/v1/models/{stream_id}")
    async def model(self, who: Caller = Who, stream_id: str = StreamId) -> dict:
        return await self._openai.model(who, stream_id)

    # ------------------------------------------------------------------ realtime
    @api.websocket("/v1/realtime")
    async def realtime(self, websocket: WebSocket, stream_id: str | None = None,
                       key: str | None = Depends(presented_ws_key)) -> None:
        """One realtime session per connection (`realtime.py`); keys, tenants and rates as for HTTP."""
        session = RealtimeSession(websocket, self._dir, self._parser, self._cfg, self._charged, self._ask)
        await session.run(stream_id, lambda: self.auth.identify(key))

    # ------------------------------------------------------------------ service
    @api.get("/health", response_model=Health, openapi_extra={"security": [{}]})  # `{}`: a key is optional
    async def health(self, key: str | None = Depends(presented_key)) -> Any:
        """Open to probes without a key; the per-shard reasons only to the admin (or with auth off)."""
        who = self.auth.identify_optional(key)
        shards = await self._dir.ask_router("health")
        ok = all(v == "ok" for v in shards.values())
        shown = shards if who is not None and who.admin else {}
        return JSONResponse({"status": "ok" if ok else "degraded", "shards": shown}, status_code=200 if ok else 503)

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self, who: Caller = Depends(_admin)) -> Response:
        names = await self._dir.ask_router("shards")
        calls = (self._dir.shard_handle(n).metrics.remote() for n in names)
        snaps = await asyncio.gather(*calls, return_exceptions=True)
        ok = [s for s in snaps if isinstance(s, dict)]
        return Response(render(ok), media_type=METRICS_CONTENT_TYPE)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _sid(who: Caller, stream_id: str) -> str:
        """The runtime's id of the caller's stream; a name that cannot be one is a stream not found
        (the chat route's `model` is free text)."""
        sid = who.internal(stream_id)
        if not is_stream_id(sid):
            raise UnknownStreamError(f"stream {stream_id[:128]!r} not found")
        return sid

    def _ask(self, params: dict[str, Any]) -> dict[str, Any]:
        """A question's engine parameters, checked as on every path (`schemas.engine_ask`)."""
        return engine_ask(params, self._cfg.ingress.max_question_chars)

    @asynccontextmanager
    async def _charged(self, who: Caller, frames: int, nbytes: int, question_tokens: int = 0) -> AsyncIterator[None]:
        """Charge the tenant's rates for the block; refunded when the block fails (429 first)."""
        self._limiter.charge(who.tenant, frames, nbytes, question_tokens)
        try:
            yield
        except BaseException:
            self._limiter.refund(who.tenant, frames, nbytes, question_tokens)
            raise

    async def _read_body(self, request: Request) -> bytes:
        limit = self._cfg.ingress.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"body of {declared} bytes exceeds {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _start_answer(self, stream_id: str, params: dict[str, Any],
                            with_end: bool = False) -> tuple[AsyncIterator[Any], float]:
        """Start a question and wait for its first item (so errors become HTTP statuses). Items are
        text deltas, then with `with_end` the shard's {"finish_reason", "usage"}."""
        start = time.perf_counter()
        it = self._dir.stream(stream_id, "ask", params, *([True] if with_end else []))
        try:
            first: Any = await it.__anext__()
        except StopAsyncIteration:
            first = None
        ttft = time.perf_counter() - start

        async def deltas() -> AsyncIterator[Any]:
            if first is None:
                return
            yield first
            async for d in it:
                yield d

        return deltas(), ttft

    def _error_json_for(self, who: Caller):
        """The error body maker of a streamed answer for this caller (its tenant prefix hidden)."""
        return lambda exc: _error_json(exc, who.prefix)

    async def _query_events(self, items: AsyncIterator[Any], start: float, ttft: float,
                            hide_prefix: str | None) -> AsyncIterator[sse.ServerSentEvent]:
        n, end = 0, end_of(None)
        try:
            async for d in items:
                if is_end(d):  # the shard's end: finish_reason and usage
                    end = end_of(d)
                    continue
                n += 1
                yield sse.event({"delta": d})
        except Exception as exc:
            yield sse.event(_error_json(exc, hide_prefix), "error")
            return
        yield sse.event({"deltas": n, "ttft_ms": ttft * 1e3, "latency_ms": (time.perf_counter() - start) * 1e3, **end},
                        "done")


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (`import_path: mosaic_ray.serve.app:build_app`, `args:` an AppConfig)."""
    cfg = AppConfig(**args)
    ing = cfg.ingress
    return MosaicIngress.options(
        num_replicas=ing.num_replicas,
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
        ray_actor_options={"num_cpus": ing.num_cpus},
    ).bind(cfg.model_dump())
