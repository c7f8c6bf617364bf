"""The Python client's realtime mode (`RealtimeSession`) against the Serve app (fake engine), and
`mosaic-ray demo --realtime` end to end (tiny model, pruning on)."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from mosaic_ray.cli import main
from mosaic_ray.client import MosaicAPIError, RealtimeSession
from mosaic_ray.client.realtime import ws_url
from mosaic_ray.demo_script import QUESTIONS

pytestmark = pytest.mark.ray
pytest.importorskip("websockets")

FRAMES = 6


def frames(n: int, start: int = 0) -> list[tuple[float, np.ndarray]]:
    rng = np.random.default_rng(start)
    return [((start + i) * 0.5, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(n)]


def test_ws_url():
    assert ws_url("http://h:8000/") == "ws://h:8000/v1/realtime"
    assert ws_url("https://h/app", "cam:1") == "wss://h/app/v1/realtime?stream_id=cam%3A1"


@pytest.mark.parametrize("bad", ["cam 1", "cam-1\n", "cam/../x", "\x00"])
def test_ws_url_refuses_an_id_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="stream id"):
        ws_url("http://h:8000", bad)


def test_push_ask_reconnect_resume(serve_url):
    with RealtimeSession(serve_url) as rt:  # a new stream
        sid = rt.stream_id
        acks = rt.push(frames(FRAMES), window=3)
        assert [a["seq"] for a in acks] == list(range(FRAMES))
        rt.add_text("a red car", ts=3.0)
        first = rt.ask("What is there?", max_tokens=6)
        assert first
        with pytest.raises(MosaicAPIError) as err:  # refused, and the session goes on
            rt.append_frame(frames(1)[0][1], ts=0.0)
        assert err.value.code == "invalid_input"
    with RealtimeSession(serve_url, stream_id=sid) as rt:  # resume: seq continues after the acks
        assert rt.next_seq == FRAMES
        assert rt.append_frame(frames(1, start=FRAMES)[0][1], ts=FRAMES * 0.5)["seq"] == FRAMES
        assert "".join(rt.ask_stream("And now?", max_tokens=6))
        assert rt.commit()["frames"] == FRAMES + 1
    httpx.delete(f"{serve_url}/v1/streams/{sid}")


def test_last_response_says_why_the_answer_ended_and_what_it_used(serve_url):
    with RealtimeSession(serve_url) as rt:
        assert rt.last_response is None
        rt.push(frames(1))
        deltas = list(rt.ask_stream("What is there?", max_tokens=2))  # cut by max_tokens
        r = rt.last_response
        assert (r["status"], r["finish_reason"], len(deltas)) == ("completed", "length", 2)
        assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        text = rt.ask("What is there now?", max_tokens=64)  # ends on its own (a word a token)
        r = rt.last_response
        assert (r["finish_reason"], r["output_text"], r["usage"]["completion_tokens"]) == ("stop", text,
                                                                                          len(text.split(" ")))
        sid = rt.stream_id
    httpx.delete(f"{serve_url}/v1/streams/{sid}")


def test_demo_realtime(ray_cluster, capsys):
    rc = main(["demo", "--realtime", "--prune", "--model", "tiny", "--max-frames", str(FRAMES), "--port", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "through the realtime WebSocket" in out
    assert re.search(rf"sent {FRAMES} frames over the WebSocket .* acknowledged through seq {FRAMES - 1}", out), out
    assert [f"Q: {q}" in out for q in QUESTIONS] == [True] * 3
    assert len(re.findall(r"first delta \d+ ms, total \d+ ms \(WebSocket, streamed\)", out)) == 3
