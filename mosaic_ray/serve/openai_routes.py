"""OpenAIRoutes: what /v1/chat/completions, /v1/completions and /v1/models do, and the bodies they
send in OpenAI's shapes (the request side is `openai_compat.py`; app.py only maps the routes here;
what the routes use of the ingress is `openai_route_host.OpenAIRouteHost`).

Invariants:
- Every question goes through the ingress's one validation layer (`MosaicIngress._ask`, i.e.
  `schemas.engine_ask`), after `refuse_unsupported` (400 naming each field) and before any frame
  of the request is appended: a refused request changes no stream.
- `finish_reason` and `usage` are the engine's (`AnswerEnd`, carried by the shard's `answer` and by
  `ask` with `with_end`), read by `answer_end.end_of` as on every path; an engine that counts no
  tokens gives `usage: null`.
- A streamed answer's status is decided by its first delta (`MosaicIngress._start_answer`); with
  `stream_options.include_usage` every chunk carries `usage: null` and one last chunk with no
  choices carries the usage, before `data: [DONE]`, as OpenAI sends it.
- /v1/models lists the caller's streams only (a tenant sees its own, by its own ids).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.serve import sse
from mosaic_ray.serve.answer_end import end_of, is_end
from mosaic_ray.serve.auth import Caller
from mosaic_ray.serve.openai_compat import ChatCompletionRequest, CompletionRequest, _OpenAIRequest, decode_image
from mosaic_ray.serve.limits import question_cost
from mosaic_ray.serve.openai_route_host import OpenAIRouteHost

OWNER = "mosaic_ray"  # `owned_by` of a stream without a tenant (auth off, or the admin's)


class OpenAIRoutes:
    def __init__(self, ingress: OpenAIRouteHost) -> None:
        self.ing = ingress

    async def chat(self, body: ChatCompletionRequest, who: Caller) -> Any:
        body.refuse_unsupported()
        sid = self.ing._sid(who, body.target)
        params = self.ing._ask(body.ask_params())
        await self._append_images(who, sid, body)
        return await self._answer(body, who, sid, params, Chat(body.model))

    async def complete(self, body: CompletionRequest, who: Caller) -> Any:
        body.refuse_unsupported()
        sid = self.ing._sid(who, body.target)
        params = self.ing._ask(body.ask_params())
        return await self._answer(body, who, sid, params, Text(body.model))

    async def models(self, who: Caller) -> dict[str, Any]:
        """OpenAI's model list: one model per stream of the caller. `created` is the response's time,
        as vLLM's is: the runtime keeps no creation time for a stream."""
        streams = await self.ing._dir.ask_router("list_streams")
        now, owner = int(time.time()), who.tenant or OWNER
        return {"object": "list", "data": [
            {"id": who.external(sid), "object": "model", "created": now, "owned_by": owner}
            for sid in sorted(streams) if who.owns(sid)]}

    async def model(self, who: Caller, model_id: str) -> dict[str, Any]:
        await self.ing._dir.call(self.ing._sid(who, model_id), "stream_info")  # 404 when not the caller's
        return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": who.tenant or OWNER}

    # ------------------------------------------------------------------ internals
    async def _append_images(self, who: Caller, sid: str, body: ChatCompletionRequest) -> None:
        """The last user message's images, checked as the frames route checks an image body, then
        appended at the message's time in one batch (so all or none of them join the stream)."""
        urls = body.images()
        if not urls:
            return
        parser = self.ing._parser
        if len(urls) > parser.max_frames:
            raise InvalidInputError(f"{len(urls)} images in one message; at most {parser.max_frames} (the frames route's bound)")
        ts = body.last_user.ts
        if ts is None:  # the stream's clock: images join after everything it holds
            ts = float((await self.ing._dir.call(sid, "stream_info")).get("duration_s") or 0.0)
        frames, nbytes = [], 0
        for url in urls:
            ctype, data = decode_image(url)
            nbytes += len(data)
            frames.extend(parser.parse_image(data, ctype, ts, None).frames)
        async with self.ing._charged(who, len(frames), nbytes):
            await self.ing._dir.call(sid, "append_frames", None, frames, [ts] * len(frames))

    async def _answer(self, body: _OpenAIRequest, who: Caller, sid: str, params: dict[str, Any], shape) -> Any:
        async with self.ing._charged(who, 0, 0, question_cost(params)):
            if body.stream:
                items, _ = await self.ing._start_answer(sid, params, with_end=True)
                on_error = self.ing._error_json_for(who)
                return sse.response(shape.events(items, body.include_usage, on_error))
            out = await self.ing._dir.call(sid, "answer", params)
        end = end_of(out)
        return shape.whole(out["text"], end["finish_reason"], end["usage"])


class _Shape:
    """One route's response bodies: `whole` (non-streaming) and `events` (SSE chunks)."""

    object_whole = object_chunk = prefix = ""

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, f"{self.prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

    def _body(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def whole(self, text: str, finish: str, usage: dict[str, int] | None) -> dict[str, Any]:
        return self._body(self.object_whole, [{"index": 0, **self.full(text), "finish_reason": finish}], usage=usage)

    async def events(self, items: AsyncIterator[Any], include_usage: bool, on_error) -> AsyncIterator[sse.ServerSentEvent]:
        extra = {"usage": None} if include_usage else {}

        def chunk(part: dict[str, Any], finish: str | None = None) -> sse.ServerSentEvent:
            return sse.event(self._body(self.object_chunk, [{"index": 0, **part, "finish_reason": finish}], **extra))

        end = end_of(None)
        if self.first() is not None:
            yield chunk(self.first())
        try:
            async for item in items:
                if is_end(item):
                    end = end_of(item)
                else:
                    yield chunk(self.delta(item))
        except Exception as exc:
            yield sse.event(on_error(exc))
            return
        yield chunk(self.delta(None), end["finish_reason"])
        if include_usage:
            yield sse.event(self._body(self.object_chunk, [], usage=end["usage"]))
        yield sse.event("[DONE]")

    def full(self, text: str) -> dict[str, Any]: ...
    def delta(self, text: str | None) -> dict[str, Any]: ...
    def first(self) -> dict[str, Any] | None: ...


class Chat(_Shape):
    object_whole, object_chunk, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def full(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def delta(self, text: str | None) -> dict[str, Any]:
        return {"delta": {} if text is None else {"content": text}}

    def first(self) -> dict[str, Any] | None:
        return {"delta": {"role": "assistant", "content": ""}}


class Text(_Shape):
    object_whole = object_chunk = "text_completion"
    prefix = "cmpl"

    def full(self, text: str) -> dict[str, Any]:
        return {"text": text, "logprobs": None}

    def delta(self, text: str | None) -> dict[str, Any]:
        return {"text": text or "", "logprobs": None}

    def first(self) -> dict[str, Any] | None:
        return None
