"""RealtimeSession alone (no Ray, no HTTP): a fake socket and a fake directory. Timers (heartbeat,
idle timeout), response.cancel, the order of acks, a refused key, and the pruned count of acks."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from starlette.websockets import WebSocketState

from mosaic_ray.engine.interface import UnknownStreamError
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


class FakeDirectory:
    """One stream `s`; every other frame is pruned; answers are 20 slow deltas."""

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

    async def stream(self, sid: str, method: str, params: dict):
        for i in range(20):
            await asyncio.sleep(0.02)
            yield f"d{i} "


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
        assert done["response"]["status"] == "cancelled" and 2 <= done["response"]["deltas"] < 20
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

    async def stream(self, sid: str, method: str, params: dict):
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
