"""Hostile input, one class at a time, on the shared Serve app: each is a 4xx JSON error, never a
5xx, and the stream it names is unchanged afterwards (`tests/serve/test_http_api.py` covers the
ordinary bad requests; this file the adversarial ones)."""

from __future__ import annotations

import io
import socket
import time

import msgpack
import pytest
from PIL import Image

from tests.runtime.fake_engine import fake_app_config
from tests.serve.serve_apps import MSGPACK, extra_app, frames_body, png

pytestmark = pytest.mark.ray

BODY_LIMIT = 4 << 20  # fake_app_config's ingress.max_body_bytes
S = "/v1/streams/{sid}"


@pytest.fixture
def stream(http, request):
    sid = f"h-{request.node.name[:40].replace('[', '-').replace(']', '').replace(' ', '-')}"
    assert http.post("/v1/streams", json={"id": sid}).status_code == 201
    assert http.post(f"/v1/streams/{sid}/frames", content=frames_body(3, n=2, ts0=10.0), headers=MSGPACK).status_code == 200
    yield sid
    http.delete(f"/v1/streams/{sid}")


def _state(http, sid: str) -> dict:
    info = http.get(f"/v1/streams/{sid}").json()
    return {k: v for k, v in info.items() if k not in ("ingest_fps", "queries_per_s")}


def _pack(obj) -> dict:
    return {"content": msgpack.packb(obj, use_bin_type=True), "headers": MSGPACK}


def _raw_json(text: str, ctype: str = "application/json") -> dict:
    return {"content": text.encode("utf-8", "surrogatepass"), "headers": {"content-type": ctype}}


def _bomb(side: int) -> bytes:
    """A 1-bit PNG of side x side: a few KB on the wire, side^2 pixels once decoded."""
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG")
    return out.getvalue()


def _nested(depth: int):
    node: object = 0.0
    for _ in range(depth):
        node = [node]
    return node


FRAME = {"ts": 20.0, "png": png()}
HOSTILE = [
    # (name, method, path, kwargs, status, code)
    # --- body size, on JSON routes too (FastAPI reads JSON itself: the middleware must stop it)
    ("json over the limit", "POST", S + "/query", _raw_json('{"question": "' + "a" * BODY_LIMIT + '"}'), 413,
     "payload_too_large"),
    ("chat over the limit", "POST", "/v1/chat/completions", _raw_json(" " * (BODY_LIMIT + 1)), 413, "payload_too_large"),
    ("create over the limit", "POST", "/v1/streams", _raw_json(" " * (BODY_LIMIT + 1)), 413, "payload_too_large"),
    ("chunked json over the limit", "POST", S + "/text",
     {"content": iter([b'{"text": "'] + [b"a" * (1 << 20)] * 5 + [b'", "ts": 1}']),
      "headers": {"content-type": "application/json"}}, 413, "payload_too_large"),
    ("chunked frames over the limit", "POST", S + "/frames",
     {"content": iter([b"\x00" * (1 << 20)] * 5), "headers": MSGPACK}, 413, "payload_too_large"),
    # --- msgpack limits: depth, widths, string length, extension types, container count
    ("msgpack too deep", "POST", S + "/frames", _pack({"frames": [{"ts": 20.0, "png": png(), "shape": _nested(6)}]}),
     400, "malformed_body"),
    ("msgpack nested to the stack limit", "POST", S + "/frames", {"content": b"\x91" * 100_000, "headers": MSGPACK},
     400, "malformed_body"),
    ("msgpack long key", "POST", S + "/frames", _pack({"frames": [FRAME], "k" * 1000: 1}), 400, "malformed_body"),
    ("msgpack wide map", "POST", S + "/frames", _pack({"frames": [FRAME], **{f"k{i}": i for i in range(100)}}), 400,
     "malformed_body"),
    ("msgpack long array", "POST", S + "/frames", _pack({"frames": [FRAME] * 1000}), 400, "malformed_body"),
    ("msgpack many containers", "POST", S + "/frames", _pack({"frames": [{"ts": 20.0, "png": png(), "shape": [[[]] * 7] * 7}] * 60}),
     400, "malformed_body"),
    ("msgpack extension type", "POST", S + "/frames", _pack({"frames": [FRAME], "x": msgpack.ExtType(1, b"boom")}), 400,
     "malformed_body"),
    ("msgpack not a map", "POST", S + "/frames", _pack([FRAME]), 422, "invalid_input"),
    ("msgpack bad utf-8", "POST", S + "/frames", {"content": b"\x81\xa2\xff\xfe\x01", "headers": MSGPACK}, 400,
     "malformed_body"),
    # --- pixels checked from the header, before decoding
    ("png bomb over our limit", "POST", S + "/frames", _pack({"frames": [{"ts": 20.0, "png": _bomb(5000)}]}), 422,
     "invalid_input"),
    ("png bomb over PIL's limit", "POST", S + "/frames?ts=20", {"content": _bomb(20000), "headers": {"content-type": "image/png"}},
     400, "malformed_body"),
    ("raw frame claiming a huge shape", "POST", S + "/frames",
     _pack({"frames": [{"ts": 20.0, "raw": b"\x00" * 12, "shape": [2**40, 2**40, 3]}]}), 422, "invalid_input"),
    ("raw frame negative shape", "POST", S + "/frames", _pack({"frames": [{"ts": 20.0, "raw": b"", "shape": [-2, 2, 3]}]}),
     422, "invalid_input"),
    # --- unknown fields
    ("unknown query field", "POST", S + "/query", {"json": {"question": "q", "temperature_x": 1}}, 422, "invalid_request"),
    ("unknown text field", "POST", S + "/text", {"json": {"text": "x", "ts": 20, "admin": True}}, 422, "invalid_request"),
    ("unknown frame field", "POST", S + "/frames", _pack({"frames": [{**FRAME, "path": "/etc/passwd"}]}), 422,
     "invalid_input"),
    ("unknown field named by a lone surrogate", "POST", S + "/query", _raw_json('{"question": "q", "\\ud800": 1}'), 422,
     "invalid_request"),
    # --- timestamps and seq
    ("nan ts in msgpack", "POST", S + "/frames", _pack({"frames": [{**FRAME, "ts": float("nan")}]}), 422, "invalid_input"),
    ("inf ts in msgpack", "POST", S + "/frames", _pack({"frames": [{**FRAME, "ts": float("inf")}]}), 422, "invalid_input"),
    ("negative ts of an image", "POST", S + "/frames?ts=-1", {"content": png(), "headers": {"content-type": "image/png"}},
     422, "invalid_request"),
    ("nan ts of an image", "POST", S + "/frames?ts=nan", {"content": png(), "headers": {"content-type": "image/png"}},
     422, "invalid_request"),
    ("ts beyond 30 years", "POST", S + "/text", {"json": {"text": "x", "ts": 1e300}}, 422, "invalid_request"),
    ("ts of an image beyond 30 years", "POST", S + "/frames?ts=1e300", {"content": png(), "headers": {"content-type": "image/png"}},
     422, "invalid_request"),
    ("ts going back", "POST", S + "/frames", _pack({"seq": 4, "frames": [{**FRAME, "ts": 1.0}]}), 422, "invalid_input"),
    ("seq going back", "POST", S + "/frames", _pack({"seq": 2, "frames": [FRAME]}), 409, "seq_conflict"),
    ("seq beyond 63 bits", "POST", S + "/frames", _pack({"seq": 2**64 - 1, "frames": [FRAME]}), 422, "invalid_input"),
    ("negative since", "POST", S + "/query", {"json": {"question": "q", "since": -5}}, 422, "invalid_request"),
    ("seed beyond 63 bits", "POST", S + "/query", {"json": {"question": "q", "seed": 2**70}}, 422, "invalid_request"),
    ("negative seed", "POST", "/v1/chat/completions",
     {"json": {"model": "{sid}", "seed": -1, "messages": [{"role": "user", "content": "q"}]}}, 422, "invalid_request"),
    # --- content types
    ("query as text/plain", "POST", S + "/query", _raw_json('{"question": "q"}', "text/plain"), 415,
     "unsupported_media_type"),
    ("chat as form", "POST", "/v1/chat/completions", _raw_json("model=x", "application/x-www-form-urlencoded"), 415,
     "unsupported_media_type"),
    ("frames as json", "POST", S + "/frames", {"json": {"frames": []}}, 415, "unsupported_media_type"),
    ("frames as gif", "POST", S + "/frames?ts=20", {"content": b"GIF89a", "headers": {"content-type": "image/gif"}}, 415,
     "unsupported_media_type"),
    # --- hostile strings
    ("nul in a question", "POST", S + "/query", {"json": {"question": "what\x00?"}}, 422, "invalid_request"),
    ("bell in text", "POST", S + "/text", {"json": {"text": "ding\x07", "ts": 20}}, 422, "invalid_request"),
    ("lone surrogate in text", "POST", S + "/text", _raw_json('{"text": "\\udc80", "ts": 20}'), 422, "invalid_request"),
    ("escape sequence in a stop", "POST", S + "/query", {"json": {"question": "q", "stop": ["\x1b[2J"]}}, 422,
     "invalid_request"),
    ("too many stops", "POST", S + "/query", {"json": {"question": "q", "stop": ["x"] * 100}}, 422, "invalid_request"),
    ("huge question", "POST", S + "/query", {"json": {"question": "a" * ((1 << 20) + 1)}}, 422, "invalid_request"),
    ("huge text", "POST", S + "/text", {"json": {"text": "a" * 20_000, "ts": 20}}, 422, "invalid_input"),
    ("nul in a chat message", "POST", "/v1/chat/completions",
     {"json": {"model": "{sid}", "messages": [{"role": "user", "content": "a\x00b"}]}}, 422, "invalid_request"),
    ("traversal as a chat model", "POST", "/v1/chat/completions",
     {"json": {"model": "../../etc/passwd", "messages": [{"role": "user", "content": "q"}]}}, 404, "stream_not_found"),
    ("huge chat model", "POST", "/v1/chat/completions",
     {"json": {"model": "m" * 10_000, "messages": [{"role": "user", "content": "q"}]}}, 422, "invalid_request"),
    # an encoded or plain ../ leaves the route (normalized by the client or the proxy): no such route
    ("traversal in a path", "GET", "/v1/streams/..%2F..%2Fetc%2Fpasswd", {}, 404, "not_found"),
    ("dot-dot stream id", "GET", "/v1/streams/..", {}, 404, "not_found"),
    ("nul in a path", "GET", "/v1/streams/a%00b", {}, 422, "invalid_request"),
    ("unicode stream id", "GET", "/v1/streams/%E2%80%AEcam", {}, 422, "invalid_request"),
    ("overlong stream id", "DELETE", "/v1/streams/" + "a" * 200, {}, 422, "invalid_request"),
    ("create a traversal id", "POST", "/v1/streams", {"json": {"id": "../x"}}, 422, "invalid_request"),
    ("create with a nul id", "POST", "/v1/streams", {"json": {"id": "a\x00"}}, 422, "invalid_request"),
    # --- one id grammar everywhere: a trailing newline is no id (issue 20, item 6)
    ("newline in a path id", "GET", "/v1/streams/{sid}%0A", {}, 422, "invalid_request"),
    ("create with a newline id", "POST", "/v1/streams", {"json": {"id": "cam-1\n"}}, 422, "invalid_request"),
    ("newline in a chat stream_id", "POST", "/v1/chat/completions",
     {"json": {"model": "x", "stream_id": "{sid}\n", "messages": [{"role": "user", "content": "q"}]}}, 422,
     "invalid_request"),
    ("newline in a chat model", "POST", "/v1/chat/completions",
     {"json": {"model": "{sid}\n", "messages": [{"role": "user", "content": "q"}]}}, 404, "stream_not_found"),
    # --- a question's length, before any tokenizer (issue 20, item 7; ingress.max_question_chars)
    ("question over max_question_chars", "POST", S + "/query", {"json": {"question": "a" * 20_000}}, 413,
     "question_too_long"),
    ("chat question over max_question_chars", "POST", "/v1/chat/completions",
     {"json": {"model": "{sid}", "messages": [{"role": "user", "content": "a" * 20_000}]}}, 413, "question_too_long"),
]


@pytest.mark.parametrize("name,method,path,kwargs,status,code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_a_json_4xx_and_changes_nothing(http, stream, name, method, path, kwargs, status, code):
    before = _state(http, stream)
    if "json" in kwargs and isinstance(kwargs["json"], dict):
        kwargs = {**kwargs, "json": {k: v.replace("{sid}", stream) if k in ("model", "stream_id") else v
                                     for k, v in kwargs["json"].items()}}
    r = http.request(method, path.format(sid=stream), **kwargs)
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and len(error["message"]) < 2000
    assert _state(http, stream) == before
    assert http.get("/health").status_code == 200  # nothing broke a shard


def test_a_trailing_slash_is_no_redirect_to_the_callers_host(http):
    """Starlette's slash redirect built its Location from the Host header (issue 20, item 11)."""
    r = http.get("/v1/streams/", headers={"host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers and "evil" not in r.text
    assert r.json()["error"]["code"] == "not_found"


DRIP_IDLE_S, DRIP_TOTAL_S = 1.0, 3.0


def test_a_slow_drip_body_is_408_in_bounded_time(serve_url):
    """A body that stops arriving, or trickles, is cut with 408 (issue 20, item 9)."""
    config = fake_app_config("driptest", num_shards=1)
    config["ingress"].update(body_idle_timeout_s=DRIP_IDLE_S, body_timeout_s=DRIP_TOTAL_S)
    with extra_app(serve_url, "driptest", config) as url:
        host, port = url.split("//")[1].split("/")[0].split(":")
        for chunks in ([b"{"], [b" "] * 40):  # stops after one byte; one byte every 0.5 s
            start = time.monotonic()
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(b"POST /driptest/v1/streams HTTP/1.1\r\nHost: h\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
                answer = _drip(sock, chunks, 0.5)
            assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer[:300]
            assert time.monotonic() - start < DRIP_TOTAL_S + 10


def _drip(sock: socket.socket, chunks: list[bytes], gap_s: float) -> bytes:
    """Send `chunks` `gap_s` apart until the server answers; what it answered."""
    sock.settimeout(gap_s)
    got = b""
    for chunk in chunks + [b""] * 60:
        if chunk:
            try:
                sock.sendall(chunk)
            except OSError:
                break
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            break
        got += data
        if b"\r\n\r\n" in got:
            break
    sock.settimeout(5)
    try:
        got += sock.recv(65536)
    except (TimeoutError, OSError):
        pass
    return got
