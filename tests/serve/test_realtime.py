"""The realtime WebSocket endpoint on a running Serve app (fake engine, 2 shards): a session end
to end, close and resume of the same stream, every kind of refused event answered by an `error`
with the session still usable, HTTP + WebSocket on one stream at once, and how `response.done`
reports an answer's end (finish_reason and usage: stop, length, cancelled by the client)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import msgpack
import numpy as np
import pytest
from PIL import Image

from tests.runtime.fake_engine import fake_app_config
from tests.serve.serve_apps import extra_app

pytestmark = pytest.mark.ray
websockets = pytest.importorskip("websockets.sync.client")

QUESTION = "What is in the scene?"
TIMEOUT_S = 30
MAX_MESSAGE_BYTES = 8 << 20  # RealtimeSpec's default


def jpeg_b64(value: int, size: int = 16) -> str:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(out, format="JPEG")
    return base64.b64encode(out.getvalue()).decode()


class Session:
    """A thin synchronous test client: send events, receive until a type comes."""

    def __init__(self, url: str, stream_id: str | None = None) -> None:
        ws_url = url.replace("http://", "ws://") + "/v1/realtime" + (f"?stream_id={stream_id}" if stream_id else "")
        self.ws = websockets.connect(ws_url, max_size=None, open_timeout=TIMEOUT_S)
        self.created = self.until("session.created")

    def send(self, **event) -> None:
        self.ws.send(json.dumps(event))

    def recv(self) -> dict:
        return json.loads(self.ws.recv(timeout=TIMEOUT_S))

    def until(self, kind: str, seen: list | None = None) -> dict:
        while True:
            ev = self.recv()
            if ev["type"] == "heartbeat":
                continue
            if seen is not None:
                seen.append(ev)
            if ev["type"] == kind:
                return ev
            assert ev["type"] != "error" or kind == "error", ev

    def error(self) -> dict:
        ev = self.until("error")
        return ev["error"]

    def append(self, seq: int | None, ts: float, value: int = 100, event_id: str | None = None) -> dict:
        self.send(type="input_video_frame.append", seq=seq, ts=ts, image=jpeg_b64(value), event_id=event_id)
        return self.until("input_video_frame.appended")

    def ask(self, question: str = QUESTION, **opts) -> tuple[str, list[dict]]:
        self.send(type="response.create", response={"question": question, "max_tokens": 8, **opts})
        seen: list[dict] = []
        done = self.until("response.done", seen)
        deltas = "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta")
        assert done["response"]["status"] == "completed" and done["response"]["output_text"] == deltas
        return deltas, seen

    def close(self) -> None:
        self.send(type="session.close")
        self.until("session.closed")
        self.ws.close()


def test_session_end_to_end_then_resume(serve_url, http):
    s = Session(serve_url)
    assert s.created["session"]["stream_id"] is None
    s.send(type="session.update", session={"stream_id": "rt-e2e", "max_tokens": 6})
    updated = s.until("session.updated")["session"]
    assert updated["stream_id"] == "rt-e2e" and updated["last_seq"] == -1 and updated["max_tokens"] == 6
    acks = [s.append(seq, ts=seq * 0.5, value=40 * seq, event_id=f"f{seq}") for seq in range(3)]
    assert [(a["seq"], a["ack_for"], a["duplicate"]) for a in acks] == [(0, "f0", False), (1, "f1", False),
                                                                      (2, "f2", False)]
    s.send(type="input_video_buffer.commit")
    assert s.until("input_video_buffer.committed")["last_seq"] == 2
    s.send(type="conversation.item.create", item={"role": "system", "content": [{"type": "input_text",
                                                                                  "text": "a red car"}]})
    s.until("conversation.item.created")
    s.send(type="conversation.item.create", item={"role": "user", "content": [{"text": QUESTION}]})
    s.until("conversation.item.created")
    s.send(type="response.create")  # asks the user item
    seen: list[dict] = []
    done = s.until("response.done", seen)
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert kinds[-2:] == ["response.output_text.done", "response.done"]
    assert done["response"]["status"] == "completed" and done["response"]["output_text"]
    s.close()

    # reconnect: the same stream, every acknowledged frame still there
    r = Session(serve_url, stream_id="rt-e2e")
    info = r.created["session"]
    assert (info["stream_id"], info["last_seq"], info["frames"]) == ("rt-e2e", 2, 3)
    assert r.append(2, ts=1.0)["duplicate"] is True  # a resent frame is not appended twice
    assert r.append(3, ts=1.5)["frames_added"] == 1
    r.ask()
    r.close()
    assert http.get("/v1/streams/rt-e2e").json()["frames"] == 4
    http.delete("/v1/streams/rt-e2e")


def test_refused_events_leave_the_session_usable(serve_url, http):
    s = Session(serve_url)
    s.ws.send("{not json")
    assert s.error()["code"] == "malformed_event"
    s.send(type="no.such.event", event_id="e1")
    err = s.error()
    assert (err["code"], err["event_id"]) == ("unknown_event", "e1")
    s.send(type="input_video_frame.append", ts=-1, image=jpeg_b64(1))
    assert s.error()["code"] == "malformed_event"
    # out of order: nothing but session.update before the session has a stream
    s.send(type="response.create", response={"question": QUESTION}, event_id="early")
    err = s.error()
    assert (err["code"], err["event_id"]) == ("no_stream", "early")
    s.send(type="input_video_frame.append", ts=0, image=jpeg_b64(1))
    assert s.error()["code"] == "no_stream"

    s.send(type="session.update", session={"new_stream": True})
    sid = s.until("session.updated")["session"]["stream_id"]
    s.ws.send("x" * (MAX_MESSAGE_BYTES + 1))
    assert s.error()["code"] == "message_too_large"
    s.ws.send(b"\x00not msgpack")
    assert s.error()["code"] == "malformed_body"
    s.send(type="input_video_frame.append", ts=0, image="not base64!!")
    assert s.error()["code"] == "malformed_event"
    assert s.append(5, ts=2.0)["seq"] == 5
    s.send(type="input_video_frame.append", seq=4, ts=3.0, image=jpeg_b64(1))  # seq going back
    assert s.error()["code"] == "seq_conflict"
    s.send(type="input_video_frame.append", ts=1.0, image=jpeg_b64(1))  # time going back
    assert s.error()["code"] == "invalid_input"
    s.send(type="response.create")  # no user item, no question
    assert s.error()["code"] == "no_question"
    s.send(type="response.cancel")
    assert s.error()["code"] == "no_response"
    s.send(type="session.update", session={"pruning": True})  # the fake engine takes no options
    assert s.error()["code"] == "invalid_input"

    # still usable: a binary msgpack batch, a ping, a question
    s.ws.send(msgpack.packb({"seq": 6, "frames": [{"ts": 4.0, "jpeg": base64.b64decode(jpeg_b64(9))}]},
                            use_bin_type=True))
    assert s.until("input_video_frame.appended")["seq"] == 6
    s.send(type="ping", event_id="p1")
    assert s.until("pong")["ping_id"] == "p1"
    s.ask()
    s.close()
    assert http.get(f"/v1/streams/{sid}").json()["frames"] == 2
    http.delete(f"/v1/streams/{sid}")


def test_http_and_websocket_on_one_stream(serve_url, http):
    sid = "rt-both"
    assert http.post("/v1/streams", json={"id": sid}).status_code == 201
    s = Session(serve_url, stream_id=sid)
    assert s.created["session"]["last_seq"] == -1
    frame = base64.b64decode(jpeg_b64(200))
    body = msgpack.packb({"seq": 0, "frames": [{"ts": 0.0, "jpeg": frame}]}, use_bin_type=True)
    assert http.post(f"/v1/streams/{sid}/frames", content=body,
                     headers={"content-type": "application/msgpack"}).status_code == 200
    assert s.append(1, ts=0.5)["seq"] == 1

    # HTTP keeps appending while the WebSocket session asks
    errors: list = []

    def push() -> None:
        for seq in range(2, 6):
            b = msgpack.packb({"seq": seq, "frames": [{"ts": seq * 0.5, "jpeg": frame}]}, use_bin_type=True)
            r = http.post(f"/v1/streams/{sid}/frames", content=b, headers={"content-type": "application/msgpack"})
            if r.status_code != 200:
                errors.append(r.text)

    pusher = threading.Thread(target=push)
    pusher.start()
    ws_answer, _ = s.ask()
    pusher.join(TIMEOUT_S)
    assert not errors and ws_answer
    assert http.post(f"/v1/streams/{sid}/query", json={"question": QUESTION, "max_tokens": 8}).status_code == 200
    s.send(type="input_video_buffer.commit")
    assert s.until("input_video_buffer.committed")["last_seq"] == 5
    assert http.get(f"/v1/streams/{sid}").json()["frames"] == 6
    s.close()
    http.delete(f"/v1/streams/{sid}")


def test_http_stream_options_refused_leave_no_stream(http):
    r = http.post("/v1/streams", json={"id": "rt-opts", "pruning": True})  # the fake engine takes no options
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    assert http.get("/v1/streams/rt-opts").status_code == 404
    assert http.post("/v1/streams", json={"id": "rt-opts", "prune_threshold": 2}).status_code == 422


def test_the_example_client_runs_and_resumes(serve_url, http, capsys):
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "realtime_client.py"
    spec = importlib.util.spec_from_file_location("realtime_client_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = argparse.Namespace(url=serve_url, stream="rt-example", video=None, fps=2.0, size=32, max_frames=3,
                              prune=False, caption="a red car", question=QUESTION, api_key=None)
    example.main(args)
    example.main(args)  # a second run resumes the stream after its last acknowledged seq
    out = capsys.readouterr().out
    assert "frame seq 5 " in out and out.count("completed, first delta") == 2, out
    assert out.count("finish_reason stop, usage {'prompt_tokens'") == 2, out  # max_tokens 24 > the fake's 11 words
    assert http.get("/v1/streams/rt-example").json()["frames"] == 6
    http.delete("/v1/streams/rt-example")


# Each would have been a 500, a poisoned stream or an engine held for seconds (issue 20, item 5).
WS_HOSTILE = [
    ("seq beyond 64 bits", {"type": "input_video_frame.append", "seq": 2**64, "ts": 5.0}),
    ("seq beyond 63 bits", {"type": "input_video_frame.append", "seq": 2**63, "ts": 5.0}),
    ("ts of 1e300", {"type": "input_video_frame.append", "ts": 1e300}),
    ("seed beyond 64 bits", {"type": "response.create", "response": {"question": QUESTION, "seed": 2**64}}),
    ("nul in a question", {"type": "response.create", "response": {"question": "what\x00?"}}),
    ("nul in system text", {"type": "conversation.item.create",
                            "item": {"role": "system", "content": [{"text": "a\x00b"}]}}),
    ("question over max_question_chars", {"type": "response.create", "response": {"question": "a" * 20_000}}),
]


@pytest.mark.parametrize("name,event", WS_HOSTILE, ids=[w[0] for w in WS_HOSTILE])
def test_websocket_refuses_what_http_refuses_and_changes_nothing(serve_url, http, name, event):
    sid = f"ws-hostile-{WS_HOSTILE.index((name, event))}"
    s = Session(serve_url, sid)
    s.append(1, ts=1.0)
    before = http.get(f"/v1/streams/{sid}").json()
    if event["type"] == "input_video_frame.append":
        event = {**event, "image": jpeg_b64(3)}
    s.send(event_id="bad", **event)
    answer = _answer_to(s, "bad")
    assert answer["type"] == "error", answer
    err = answer["error"]
    assert err.get("status", 400) < 500, err
    assert s.append(None, ts=2.0)["seq"] == 2  # seq-less appends still work, after the last acked seq
    s.close()
    after = http.get(f"/v1/streams/{sid}").json()
    assert (after["last_seq"], after["frames"]) == (2, before["frames"] + 1)
    assert http.get("/health").status_code == 200
    http.delete(f"/v1/streams/{sid}")


def _answer_to(s: Session, event_id: str) -> dict:
    """The first event answering `event_id` (an error, an ack, a response's end), within TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        ev = s.recv()
        if ev.get("ack_for") == event_id or ev.get("error", {}).get("event_id") == event_id \
                or ev["type"] == "response.done":
            return ev
    raise AssertionError(f"no answer to {event_id} within {TIMEOUT_S} s")


def test_a_stream_id_with_a_newline_makes_no_stream(serve_url, http):
    with websockets.connect(serve_url.replace("http://", "ws://") + "/v1/realtime?stream_id=cam-nl%0A",
                            open_timeout=TIMEOUT_S) as ws:
        first, created = (json.loads(ws.recv(timeout=TIMEOUT_S)) for _ in range(2))
    assert first["type"] == "error" and first["error"]["code"] == "invalid_request"
    assert created["type"] == "session.created" and created["session"]["stream_id"] is None
    assert not any(ref["id"].startswith("cam-nl") for ref in http.get("/v1/streams").json()["streams"])


# ---------------------------------------------------------------------- how an answer ends
FAKE_ANSWER_WORDS = 11  # "I saw N frames and M notes; brightness B; digest D." (a word a token)
TOKEN_DELAY_S = 0.25  # the slow app's engine time per token: room to cancel mid-answer


def _deltas_of(seen: list[dict]) -> list[str]:
    return [e["delta"] for e in seen if e["type"] == "response.output_text.delta"]


def test_done_reports_stop_and_length_with_the_engines_usage(serve_url, http):
    s = Session(serve_url, "rt-finish")
    s.append(0, ts=0.0)
    _, seen = s.ask(max_tokens=64)  # the answer ends before max_tokens
    deltas, done = _deltas_of(seen), seen[-1]["response"]
    assert (done["finish_reason"], len(deltas), done["deltas"]) == ("stop", FAKE_ANSWER_WORDS, FAKE_ANSWER_WORDS)
    assert done["usage"] == {"prompt_tokens": len(QUESTION.split()), "completion_tokens": len(deltas),
                             "total_tokens": len(QUESTION.split()) + len(deltas)}
    text, seen = s.ask("Which frames?", max_tokens=2)  # cut by max_tokens
    deltas, done = _deltas_of(seen), seen[-1]["response"]
    assert (done["finish_reason"], len(deltas), len(text.split())) == ("length", 2, 2)
    assert done["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    # the same fields, counted the same way, as the HTTP query of the same stream
    q = http.post("/v1/streams/rt-finish/query", json={"question": QUESTION, "max_tokens": 3}).json()
    assert (q["finish_reason"], q["usage"]["prompt_tokens"], q["usage"]["completion_tokens"]) == (
        "length", len(QUESTION.split()), 3)
    s.close()
    http.delete("/v1/streams/rt-finish")


@pytest.fixture(scope="module")
def slow_url(serve_url):
    with extra_app(serve_url, "rtslow", fake_app_config("rtslow", num_shards=1, token_delay_s=TOKEN_DELAY_S)) as url:
        yield url


def test_done_reports_a_cancel_mid_answer_then_the_session_answers_again(slow_url):
    s = Session(slow_url, "rt-cancel")
    s.append(0, ts=0.0)
    s.send(type="response.create", response={"question": QUESTION, "max_tokens": 64})
    seen: list[dict] = []
    s.until("response.output_text.delta", seen)
    s.until("response.output_text.delta", seen)
    s.send(type="response.cancel")
    done = s.until("response.done", seen)["response"]
    deltas = _deltas_of(seen)
    assert (done["status"], done["finish_reason"], done["usage"]) == ("cancelled", "cancelled", None)
    assert 2 <= done["deltas"] == len(deltas) < FAKE_ANSWER_WORDS and done["output_text"] == "".join(deltas)
    assert "response.output_text.done" not in [e["type"] for e in seen]
    _, seen = s.ask(max_tokens=3)  # the stream and the session go on
    assert (seen[-1]["response"]["finish_reason"], seen[-1]["response"]["usage"]["completion_tokens"]) == ("length", 3)
    s.close()
