"""The HTTP API on a running Serve app (fake engine, 2 shards): every route, SSE, seq
deduplication over HTTP, /health, /metrics, and a 4xx JSON error for each kind of bad request."""

from __future__ import annotations

import io
import json

import msgpack
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.ray

MSGPACK = {"content-type": "application/msgpack"}


def _image(fmt: str, value: int = 120, size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(out, format=fmt)
    return out.getvalue()


def _noise_jpeg(size: int = 128) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _batch(seq, frames) -> bytes:
    return msgpack.packb({"seq": seq, "frames": frames}, use_bin_type=True)


@pytest.fixture
def stream(http, request):
    sid = f"t-{request.node.name[:40].replace('[', '-').replace(']', '')}"
    assert http.post("/v1/streams", json={"id": sid}).status_code == 201
    yield sid
    http.delete(f"/v1/streams/{sid}")


def _sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = "message", ""
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        events.append((name, json.loads(data)))
    return events


def test_stream_lifecycle(http):
    made = http.post("/v1/streams")
    assert made.status_code == 201
    sid, shard = made.json()["id"], made.json()["shard"]
    assert {"id": sid, "shard": shard} in http.get("/v1/streams").json()["streams"]
    info = http.get(f"/v1/streams/{sid}").json()
    assert info["id"] == sid and info["frames"] == 0 and info["last_seq"] == -1
    assert http.delete(f"/v1/streams/{sid}").json() == {"id": sid, "deleted": True}
    assert http.get(f"/v1/streams/{sid}").status_code == 404


def test_frames_in_every_encoding_and_seq_deduplication(http, stream):
    raw = np.arange(8 * 8 * 3, dtype=np.uint8).tobytes()
    body = _batch(0, [
        {"ts": 0.0, "jpeg": _image("JPEG")},
        {"ts": 0.5, "png": _image("PNG")},
        {"ts": 1.0, "raw": raw, "shape": [8, 8, 3]},
    ])
    ack = http.post(f"/v1/streams/{stream}/frames", content=body, headers=MSGPACK).json()
    assert ack == {"stream_id": stream, "seq": 0, "frames_added": 3, "frames_total": 3, "duplicate": False,
                   "frames_pruned": None}  # the fake engine does not prune
    again = http.post(f"/v1/streams/{stream}/frames", content=body, headers=MSGPACK).json()
    assert again["duplicate"] and again["frames_added"] == 0
    one = http.post(f"/v1/streams/{stream}/frames?ts=2.0&seq=1", content=_image("JPEG"),
                    headers={"content-type": "image/jpeg"}).json()
    assert one["seq"] == 1 and one["frames_added"] == 1
    info = http.get(f"/v1/streams/{stream}").json()
    assert info["frames"] == 4 and info["last_seq"] == 1


def test_query_json_and_sse_agree(http, stream):
    http.post(f"/v1/streams/{stream}/frames", content=_batch(0, [{"ts": 0.0, "png": _image("PNG", 30)}]),
              headers=MSGPACK)
    assert http.post(f"/v1/streams/{stream}/text", json={"text": "a red car enters", "ts": 0.5}).status_code == 200
    twin = stream + "-twin"
    http.post("/v1/streams", json={"id": twin})
    http.post(f"/v1/streams/{twin}/frames", content=_batch(0, [{"ts": 0.0, "png": _image("PNG", 30)}]),
              headers=MSGPACK)
    http.post(f"/v1/streams/{twin}/text", json={"text": "a red car enters", "ts": 0.5})

    answer = http.post(f"/v1/streams/{stream}/query", json={"question": "what enters?", "max_tokens": 32}).json()
    assert answer["answer"].startswith("I saw 1 frames") and answer["deltas"] > 1
    with http.stream("POST", f"/v1/streams/{twin}/query", json={"question": "what enters?", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.read().decode())
    deltas = [d["delta"] for name, d in events if name == "message"]
    assert events[-1][0] == "done" and events[-1][1]["deltas"] == len(deltas)
    assert "".join(deltas) == answer["answer"]
    # the engine's end (the fake engine counts words as tokens): on both, and "length" when cut
    assert answer["finish_reason"] == events[-1][1]["finish_reason"] == "stop"
    assert answer["usage"] == events[-1][1]["usage"] == {"prompt_tokens": 2, "completion_tokens": len(deltas),
                                                         "total_tokens": 2 + len(deltas)}
    cut = http.post(f"/v1/streams/{stream}/query", json={"question": "what enters?", "max_tokens": 2}).json()
    assert cut["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 2
    windowed = http.post(f"/v1/streams/{stream}/query", json={"question": "q", "since": 5, "until": 9}).json()
    assert windowed["answer"].startswith("I saw 0 frames")
    http.delete(f"/v1/streams/{twin}")


def test_health_and_metrics(http, stream):
    http.post(f"/v1/streams/{stream}/frames", content=_batch(0, [{"ts": 0.0, "png": _image("PNG")}]), headers=MSGPACK)
    http.post(f"/v1/streams/{stream}/query", json={"question": "anything?"})
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and len(health.json()["shards"]) == 2
    text = http.get("/metrics").text
    for name in ("mosaic_frames_total", "mosaic_ingest_frames_per_second", "mosaic_queries_total",
                 "mosaic_time_to_first_token_seconds_bucket", "mosaic_e2e_request_latency_seconds_bucket",
                 "mosaic_prompt_tokens_total", "mosaic_kv_bytes", "mosaic_streams"):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text or name in text
    frames = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("mosaic_frames_total{"))
    assert frames >= 1
    assert 'le="+Inf"' in text


def _msgpack(*frames) -> dict:
    return {"content": _batch(0, list(frames)), "headers": MSGPACK}


def _body(data: bytes, ctype: str) -> dict:
    return {"content": data, "headers": {"content-type": ctype}}


S = "/v1/streams/{sid}"
PNG_FRAME = {"ts": 0.0, "png": _image("PNG")}
BAD_REQUESTS = [
    # (name, method, path, kwargs, status, code)
    ("unknown stream", "GET", "/v1/streams/nope", {}, 404, "stream_not_found"),
    ("unknown stream frames", "POST", "/v1/streams/nope/frames", _msgpack(PNG_FRAME), 404, "stream_not_found"),
    ("unknown stream query", "POST", "/v1/streams/nope/query", {"json": {"question": "q"}}, 404, "stream_not_found"),
    ("bad stream id", "GET", "/v1/streams/bad%20id", {}, 422, "invalid_request"),
    ("create bad id", "POST", "/v1/streams", {"json": {"id": "has/slash"}}, 422, "invalid_request"),
    ("create unknown field", "POST", "/v1/streams", {"json": {"name": "x"}}, 422, "invalid_request"),
    ("not json", "POST", S + "/query", _body(b"{nope", "application/json"), 400, "malformed_body"),
    ("no question", "POST", S + "/query", {"json": {"max_tokens": 3}}, 422, "invalid_request"),
    ("zero tokens", "POST", S + "/query", {"json": {"question": "q", "max_tokens": 0}}, 422, "invalid_request"),
    ("since after until", "POST", S + "/query", {"json": {"question": "q", "since": 5, "until": 1}}, 422,
     "invalid_request"),
    ("wrong media type", "POST", S + "/frames", _body(b"x", "text/plain"), 415, "unsupported_media_type"),
    ("not msgpack", "POST", S + "/frames", _body(b"\xc1\xc1", MSGPACK["content-type"]), 400, "malformed_body"),
    ("no frames", "POST", S + "/frames", _msgpack(), 422, "invalid_input"),
    ("two payloads", "POST", S + "/frames", _msgpack({**PNG_FRAME, "jpeg": _image("JPEG")}), 422, "invalid_input"),
    ("negative ts", "POST", S + "/frames", _msgpack({**PNG_FRAME, "ts": -1.0}), 422, "invalid_input"),
    ("corrupt jpeg", "POST", S + "/frames", _msgpack({"ts": 0.0, "jpeg": b"\xff\xd8garbage"}), 400, "malformed_body"),
    # The header is fine, so the ingress forwards it; the shard's decoder refuses it.
    ("truncated jpeg", "POST", S + "/frames", _msgpack({"ts": 0.0, "jpeg": _noise_jpeg()[:2000]}), 400,
     "malformed_body"),
    ("png said jpeg", "POST", S + "/frames", _msgpack({"ts": 0.0, "jpeg": _image("PNG")}), 422, "invalid_input"),
    ("raw size mismatch", "POST", S + "/frames", _msgpack({"ts": 0.0, "raw": b"\x00" * 10, "shape": [8, 8, 3]}),
     422, "invalid_input"),
    ("image without ts", "POST", S + "/frames", _body(_image("JPEG"), "image/jpeg"), 422, "invalid_input"),
    ("too large", "POST", S + "/frames", _body(b"\x00" * (5 << 20), MSGPACK["content-type"]), 413,
     "payload_too_large"),
    ("empty text", "POST", S + "/text", {"json": {"text": "", "ts": 0}}, 422, "invalid_request"),
    ("nan ts text", "POST", S + "/text", _body(b'{"text": "x", "ts": NaN}', "application/json"), 422,
     "invalid_request"),
    ("no route", "GET", "/v1/nothing", {}, 404, "not_found"),
    ("wrong method", "PUT", "/v1/streams", {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize("name,method,path,kwargs,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_json_4xx_and_change_nothing(http, stream, name, method, path, kwargs, status, code):
    before = http.get(f"/v1/streams/{stream}").json()
    r = http.request(method, path.format(sid=stream), **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert http.get(f"/v1/streams/{stream}").json() == before


def test_conflicts(http, stream):
    dup = http.post("/v1/streams", json={"id": stream})
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "stream_exists"
    frames = f"/v1/streams/{stream}/frames"
    http.post(frames, content=_batch(5, [{"ts": 0.0, "png": _image("PNG")}]), headers=MSGPACK)
    old = http.post(frames, content=_batch(4, [{"ts": 1.0, "png": _image("PNG")}]), headers=MSGPACK)
    assert old.status_code == 409 and old.json()["error"]["code"] == "seq_conflict"
