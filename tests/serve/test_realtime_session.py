"""RealtimeSession alone (no Ray, no HTTP): a fake socket and a fake directory. Timers (heartbeat,
idle timeout), response.cancel, the order of acks, a refused key, the pruned count of acks, and how
`response.done` reports an answer's end (finish_reason, usage: stop, length, cancelled, error)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from starlette.websockets import WebSocketState

from mosaic_ray.engine.interface import AnswerEnd, UnknownStreamError
from mosaic_ray.serve.config import AppConfig
from mosaic_ray.serve.errors import UnauthorizedError
from mosaic_ray.serve.frames import FrameParser
from mosaic_ray.serve.realtime import RealtimeSession

HEARTBEAT_S = 0.05
IDLE_S = 0.6


def jpeg_b64() -> str:
    out = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 50, np.uint8)).save(out, format="JPEG")
    return base64.b64encode(out.getvalue()).decode()


class FakeSocket:
    def __init__(self) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent: list[dict] = []
        self.closed: tuple[int, str] | None = None
        self.application_state = WebSocketState.CONNECTING

    async def accept(self) -> None:
        self.application_state = WebSocketState.CONNECTED

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)
        self.application_state = WebSocketState.DISCONNECTED

    def push(self, **event) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "text": json.dumps(event)})

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.sent]


ANSWER_WORDS = 20


class FakeDirectory:
    """One stream `s`; every other frame is pruned; answers are ANSWER_WORDS slow one-word deltas
    (a word a token, as the fake engine's), cut at max_tokens, then with `with_end` the shard's
    end item as `AnswerEnd.as_dict` makes it."""

    def __init__(self) -> None:
        self.last_seq, self.frames, self.pruned = -1, 0, 0

    async def call(self, sid: str, method: str, *args):
        if sid != "s":
            raise UnknownStreamError(f"stream {sid!r} not found")
        if method == "stream_info":
            return {"last_seq": self.last_seq, "frames": self.frames, "frames_pruned": self.pruned}
        if method == "append_frames":
            seq, frames, _ = args
            await asyncio.sleep(0.01 * (3 - len(frames)))  # acks must still come back in order
            self.last_seq = self.last_seq + 1 if seq is None else seq
            self.frames += 1
            self.pruned += self.frames % 2 == 0
            return {"seq": self.last_seq, "frames_added": 1, "duplicate": False, "frames_total": self.frames,
                    "frames_pruned": self.pruned}
        raise AssertionError(method)

    async def ask_router(self, method: str, *args):
        return {"id": args[0] or "s", "shard": "x"}

    async def stream(self, sid: str, method: str, params: dict, with_end: bool = False):
        n = min(ANSWER_WORDS, params["max_tokens"])
        for i in range(n):
            await asyncio.sleep(0.02)
            yield f"d{i} "
        if with_end:
            yield AnswerEnd("length" if n < ANSWER_WORDS else "stop", len(params["question"].split()), n).as_dict()


def session(identify=None, **realtime) -> tuple[FakeSocket, asyncio.Task]:
    cfg = AppConfig(ingress={"realtime": {"heartbeat_s": HEARTBEAT_S, "idle_timeout_s": IDLE_S, **realtime}})
    ws = FakeSocket()
    rt = RealtimeSession(ws, FakeDirectory(), FrameParser(8, 1 << 20), cfg)
    return ws, asyncio.get_running_loop().create_task(rt.run("s", identify))


async def until(ws: FakeSocket, kind: str, n: int = 1, timeout: float = 5.0) -> list[dict]:
    for _ in range(int(timeout / 0.01)):
        got = [e for e in ws.sent if e["type"] == kind]
        if len(got) >= n:
            return got
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {n} x {kind} in {ws.kinds()}")


def test_heartbeats_then_idle_close():
    async def go():
        ws, task = session()
        await until(ws, "heartbeat", 3)
        await asyncio.wait_for(task, 5)
        assert ws.closed == (1001, "idle timeout")

    asyncio.run(go())


def test_acks_in_order_with_pruned_counts_then_cancel_and_close():
    async def go():
        ws, task = session()
        for seq in range(4):
            ws.push(type="input_video_frame.append", seq=seq, ts=seq, image=jpeg_b64(), event_id=f"f{seq}")
        acks = await until(ws, "input_video_frame.appended", 4)
        assert [(a["seq"], a["ack_for"], a["pruned"]) for a in acks] == [(0, "f0", 0), (1, "f1", 1), (2, "f2", 0),
                                                                        (3, "f3", 1)]
        ws.push(type="response.create", response={"question": "what?"})
        await until(ws, "response.output_text.delta", 2)
        ws.push(type="response.cancel")
        (done,) = await until(ws, "response.done")
        assert done["response"]["status"] == "cancelled" and 2 <= done["response"]["deltas"] < ANSWER_WORDS
        assert (done["response"]["finish_reason"], done["response"]["usage"]) == ("cancelled", None)
        ws.push(type="session.close")
        await asyncio.wait_for(task, 5)
        assert ws.kinds()[-1] == "session.closed" and ws.closed == (1000, "")

    asyncio.run(go())


def test_refused_key_gets_one_error_and_1008():
    def refuse():
        raise UnauthorizedError("the API key is not valid")

    async def go():
        ws, task = session(identify=refuse)
        await asyncio.wait_for(task, 5)
        assert ws.kinds() == ["error"] and ws.sent[0]["error"]["code"] == "unauthorized"
        assert ws.closed[0] == 1008

    asyncio.run(go())


def test_disconnect_ends_the_session():
    async def go():
        ws, task = session()
        ws.inbox.put_nowait({"type": "websocket.disconnect", "code": 1006})
        await asyncio.wait_for(task, 5)
        assert ws.kinds() == ["session.created"]

    asyncio.run(go())


@pytest.mark.parametrize("bad", [{"heartbeat_s": 1.0, "idle_timeout_s": 0.5}, {"max_message_bytes": 10}])
def test_spec_is_checked(bad):
    with pytest.raises(ValueError):
        AppConfig(ingress={"realtime": bad})


class RecordingDirectory(FakeDirectory):
    """FakeDirectory that records what reached it: creates and questions."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[str] = []
        self.asked: list[dict] = []

    async def ask_router(self, method: str, *args):
        self.created.append(args[0])
        return await super().ask_router(method, *args)

    async def stream(self, sid: str, method: str, params: dict, with_end: bool = False):
        self.asked.append(params)
        yield "ok"


def test_a_stream_id_with_a_newline_opens_nothing():
    async def go():
        ws, d = FakeSocket(), RecordingDirectory()
        task = asyncio.get_running_loop().create_task(
            RealtimeSession(ws, d, FrameParser(8, 1 << 20), AppConfig()).run("cam-1\n"))
        (err,) = await until(ws, "error")
        assert err["error"]["code"] == "invalid_request"
        ws.push(type="session.close")
        await asyncio.wait_for(task, 5)
        assert d.created == [] and ws.sent[1]["session"]["stream_id"] is None

    asyncio.run(go())


def test_a_long_question_never_reaches_the_engine_and_bounds_hold():
    async def go():
        ws, d = FakeSocket(), RecordingDirectory()
        cfg = AppConfig(ingress={"max_question_chars": 50})
        task = asyncio.get_running_loop().create_task(RealtimeSession(ws, d, FrameParser(8, 1 << 20), cfg).run("s"))
        ws.push(type="conversation.item.create", event_id="i1", item={"content": [{"text": "a" * 51}]})
        ws.push(type="response.create", event_id="r1", response={"question": "a" * 51})
        ws.push(type="response.create", event_id="r2", response={"question": "q", "temperature": 1e-39, "top_p": 1e-46})
        await until(ws, "response.done")
        errors = [e["error"] for e in ws.sent if e["type"] == "error"]
        assert [(e["event_id"], e["code"], e.get("status")) for e in errors] == [
            ("i1", "question_too_long", 413), ("r1", "question_too_long", 413)]
        assert [(p["question"], p["temperature"], p["top_p"]) for p in d.asked] == [("q", 0.0, 1e-6)]
        ws.push(type="session.close")
        await asyncio.wait_for(task, 5)

    asyncio.run(go())


# ---------------------------------------------------------------------- how an answer ends
class EndingDirectory(FakeDirectory):
    """FakeDirectory whose answers may fail midway (`fail_after` deltas) or stay open after the
    end item (`linger_s`: the shard's generator not yet closed when a cancel comes)."""

    def __init__(self, fail_after: int | None = None, linger_s: float = 0.0) -> None:
        super().__init__()
        self.fail_after, self.linger_s = fail_after, linger_s

    async def stream(self, sid: str, method: str, params: dict, with_end: bool = False):
        assert with_end, "the session must ask for the shard's end item"
        n = 0
        async for item in super().stream(sid, method, params, with_end):
            if self.fail_after is not None and n == self.fail_after:
                raise RuntimeError("the shard lost the answer")
            n += isinstance(item, str)
            yield item
        await asyncio.sleep(self.linger_s)


async def answer(ws: FakeSocket, n: int = 1, cancel_after: int | None = None, **response) -> tuple[list[str], dict]:
    """Ask (the n-th answer of the session); cancel after `cancel_after` deltas; (deltas, response.done's response)."""
    ws.push(type="response.create", response={"question": "what is in it?", **response})
    if cancel_after is not None:
        await until(ws, "response.output_text.delta", cancel_after)
        ws.push(type="response.cancel")
    done = (await until(ws, "response.done", n))[-1]["response"]
    deltas = [e["delta"] for e in ws.sent if e["type"] == "response.output_text.delta" and e["response_id"] == done["id"]]
    return deltas, done


def run_with(directory: FakeDirectory, go) -> None:
    async def main():
        ws = FakeSocket()
        task = asyncio.get_running_loop().create_task(
            RealtimeSession(ws, directory, FrameParser(8, 1 << 20), AppConfig()).run("s"))
        await go(ws)
        ws.push(type="session.close")
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_done_reports_stop_and_length_with_the_engines_usage():
    async def go(ws):
        deltas, done = await answer(ws, max_tokens=64)  # the answer ends before max_tokens
        assert (done["status"], done["finish_reason"], len(deltas), done["deltas"]) == ("completed", "stop", 20, 20)
        assert done["usage"] == {"prompt_tokens": 4, "completion_tokens": 20, "total_tokens": 24}
        deltas, done = await answer(ws, 2, max_tokens=2)
        assert (done["status"], done["finish_reason"], len(deltas)) == ("completed", "length", 2)
        assert done["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
        assert done["output_text"] == "".join(deltas)
        assert ws.kinds().count("response.output_text.done") == 2

    run_with(FakeDirectory(), go)


def test_done_reports_cancelled_then_the_session_answers_again():
    async def go(ws):
        deltas, done = await answer(ws, cancel_after=3, max_tokens=64)
        assert (done["status"], done["finish_reason"], done["usage"]) == ("cancelled", "cancelled", None)
        assert 3 <= done["deltas"] == len(deltas) < ANSWER_WORDS and done["output_text"] == "".join(deltas)
        _, done = await answer(ws, 2, max_tokens=5)
        assert (done["finish_reason"], done["usage"]["completion_tokens"]) == ("length", 5)

    run_with(FakeDirectory(), go)


def test_done_reports_error_after_the_error_event():
    async def go(ws):
        deltas, done = await answer(ws, max_tokens=64)
        assert (done["status"], done["finish_reason"], done["usage"], len(deltas)) == ("failed", "error", None, 3)
        kinds = ws.kinds()
        assert kinds.index("error") < kinds.index("response.done") and "response.output_text.done" not in kinds

    run_with(EndingDirectory(fail_after=3), go)


def test_a_cancel_after_the_engines_end_keeps_the_answer_whole():
    async def go(ws):
        ws.push(type="response.create", response={"question": "what?", "max_tokens": 2})
        await until(ws, "response.output_text.delta", 2)
        await asyncio.sleep(0.2)  # the end item is in; the shard's generator is still open
        ws.push(type="response.cancel")
        (done,) = await until(ws, "response.done")
        r = done["response"]
        assert (r["status"], r["finish_reason"], r["usage"]["completion_tokens"]) == ("completed", "length", 2)

    run_with(EndingDirectory(linger_s=1.0), go)
