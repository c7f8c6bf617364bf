"""API keys and tenants over HTTP: 401 without or with a wrong key, 404 across tenants on every
stream route (list filtered, create never leaks existence), 403 for a tenant on admin routes, 429
over the stream quota and the frames/s rate with Retry-After, ownership across a router restart;
and the key parsing of `auth.py` without Ray."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from fastapi import Depends, FastAPI, WebSocket  # module level: the test app's annotations are strings
from fastapi.testclient import TestClient

from mosaic_ray.serve.auth import OPEN, Authenticator, Caller, parse_env_keys, presented_key, presented_ws_key
from mosaic_ray.serve.config import AuthSpec
from tests.runtime.fake_engine import fake_app_config
from tests.serve.serve_apps import MSGPACK, extra_app, frames_body

KEY_A = "key-alpha-0123456789abcdef"
KEY_B = "key-beta-0123456789abcdef"
KEY_C = "key-gamma-0123456789abcdef"  # the limited tenant
KEY_D = "key-delta-0123456789abcdef"  # the tenant with a question budget
QTPS, QBURST_S = 2.0, 10.0  # delta's question tokens/s: a bucket of 20, one 16-token question, not two
ADMIN = "admin-0123456789abcdefghij"
QUOTA = 2  # streams gamma may hold
FPS, BURST_S = 4.0, 1.0  # gamma's frames/s: a bucket of 4 frames

CONFIG = {
    **fake_app_config("authtest", num_shards=1),
    "auth": {
        "keys": {KEY_A: "alpha", KEY_B: "beta", KEY_C: "gamma", KEY_D: "delta"},
        "admin_key": ADMIN,
        "tenants": {"gamma": {"max_streams": QUOTA, "frames_per_s": FPS, "burst_s": BURST_S,
                              "streams_retry_after_s": 30},
                    "delta": {"question_tokens_per_s": QTPS, "burst_s": QBURST_S}},
    },
}


@pytest.fixture(scope="module")
def base(serve_url):
    with extra_app(serve_url, "authtest", CONFIG) as url:
        yield url


def _client(base: str, key: str | None = None, header: str = "bearer") -> httpx.Client:
    headers = {} if key is None else (
        {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key})
    return httpx.Client(base_url=base, headers=headers, timeout=30)


def _state(info: dict) -> dict:
    """A stream's info without its decaying rates (which change by the second)."""
    return {k: v for k, v in info.items() if k not in ("ingest_fps", "queries_per_s")}


def _routes(sid: str) -> list[tuple[str, str, dict]]:
    """Every stream route with a valid request for stream `sid`."""
    s = f"/v1/streams/{sid}"
    return [
        ("GET", s, {}),
        ("POST", f"{s}/frames", {"content": frames_body(None, ts0=50.0), "headers": MSGPACK}),
        ("POST", f"{s}/text", {"json": {"text": "hello", "ts": 60.0}}),
        ("POST", f"{s}/query", {"json": {"question": "what?"}}),
        ("POST", "/v1/chat/completions", {"json": {"model": sid, "messages": [{"role": "user", "content": "q"}]}}),
        ("POST", "/v1/completions", {"json": {"model": sid, "prompt": "q"}}),
        ("GET", f"/v1/models/{sid}", {}),
        ("DELETE", s, {}),
    ]


@pytest.mark.ray
@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef"], ids=["no key", "wrong key"])
def test_every_route_but_health_needs_a_valid_key(base, key):
    routes = [("GET", "/v1/streams", {}), ("POST", "/v1/streams", {"json": {"id": "x"}}), ("GET", "/v1/models", {}),
              ("GET", "/metrics", {}), *_routes("x"),
              # 401 comes before validation: an invalid body is not even looked at
              ("POST", "/v1/streams/x/query", {"json": {"nope": 1}})]
    for header in ("bearer", "x-api-key"):
        with _client(base, key, header) as c:
            for method, path, kw in routes:
                r = c.request(method, path, **kw)
                assert r.status_code == 401, (method, path, r.text)
                assert r.json()["error"]["code"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
    with _client(base) as c:
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["shards"] == {}  # open, without details
    with _client(base, ADMIN) as c:
        assert len(c.get("/health").json()["shards"]) == 1


@pytest.mark.ray
def test_a_tenant_sees_only_its_own_streams(base):
    with _client(base, KEY_A, "x-api-key") as a, _client(base, KEY_B) as b, _client(base, ADMIN) as admin:
        assert a.post("/v1/streams", json={"id": "cam"}).json()["id"] == "cam"
        assert a.post("/v1/streams/cam/frames", content=frames_body(0, n=2), headers=MSGPACK).status_code == 200
        before = _state(a.get("/v1/streams/cam").json())
        assert before["id"] == "cam" and before["frames"] == 2 and before["last_seq"] == 0

        # Another tenant: exactly what a stream that does not exist gets, on every route.
        for (method, path, kw), (_, never_path, never_kw) in zip(_routes("cam"), _routes("never-made")):
            theirs, nothing = b.request(method, path, **kw), b.request(method, never_path, **never_kw)
            assert theirs.status_code == nothing.status_code == 404, (method, path, theirs.text)
            assert theirs.json()["error"]["code"] == nothing.json()["error"]["code"] == "stream_not_found"
            assert "alpha" not in theirs.text
        assert _state(a.get("/v1/streams/cam").json()) == before  # nothing B did touched it

        # B may create the same id: a different stream, and no hint that A's exists.
        made = b.post("/v1/streams", json={"id": "cam"})
        assert made.status_code == 201 and made.json()["id"] == "cam"
        assert b.get("/v1/streams/cam").json()["frames"] == 0
        generated = b.post("/v1/streams").json()["id"]
        assert ":" not in generated and b.get(f"/v1/streams/{generated}").status_code == 200

        assert {s["id"] for s in a.get("/v1/streams").json()["streams"]} == {"cam"}
        assert {s["id"] for s in b.get("/v1/streams").json()["streams"]} == {"cam", generated}
        # /v1/models: the same streams, as OpenAI models owned by the tenant
        models = b.get("/v1/models").json()
        assert models["object"] == "list" and {m["id"] for m in models["data"]} == {"cam", generated}
        assert {(m["object"], m["owned_by"]) for m in models["data"]} == {("model", "beta")}
        assert [m["id"] for m in a.get("/v1/models").json()["data"]] == ["cam"]
        everything = {s["id"] for s in admin.get("/v1/streams").json()["streams"]}
        assert {"alpha:cam", "beta:cam", f"beta:{generated}"} <= everything
        assert admin.get("/v1/streams/alpha:cam").json()["frames"] == 2
        # A tenant cannot reach around its prefix by naming one.
        assert a.get("/v1/streams/beta:cam").status_code == 404

        assert a.delete("/v1/streams/cam").status_code == 200
        assert b.get("/v1/streams/cam").json()["frames"] == 0  # B's own is untouched
        for sid in ("cam", generated):
            b.delete(f"/v1/streams/{sid}")


@pytest.mark.ray
def test_error_bodies_show_a_tenant_its_own_ids_only(base):
    """The runtime names streams `tenant:id`; a tenant's error bodies must not (issue 20, item 11)."""
    with _client(base, KEY_B) as b:
        answers = [b.get("/v1/streams/never-made"),  # the router's 404
                   b.post("/v1/streams", json={"id": "x" * 128}),  # `beta:` + 128 is over the grammar
                   b.post("/v1/streams/never-made/query", json={"question": "q"})]
        assert [r.status_code for r in answers] == [404, 422, 404]
        for r in answers:
            assert "beta:" not in r.json()["error"]["message"] and "shard:" not in r.text, r.text


@pytest.mark.ray
def test_openai_client_sends_its_key_and_sees_only_its_streams(base):
    with _client(base, KEY_A) as a:
        a.post("/v1/streams", json={"id": "chat-cam"})
        a.post("/v1/streams/chat-cam/frames", content=frames_body(0), headers=MSGPACK)
    messages = [{"role": "user", "content": "What do you see?"}]
    try:
        mine = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY_A, max_retries=0)
        assert mine.chat.completions.create(model="chat-cam", messages=messages).choices[0].message.content
        theirs = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY_B, max_retries=0)
        with pytest.raises(openai.NotFoundError):
            theirs.chat.completions.create(model="chat-cam", messages=messages)
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key="not-a-key-0123456789", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="chat-cam", messages=messages)
    finally:
        with _client(base, KEY_A) as a:
            a.delete("/v1/streams/chat-cam")


@pytest.mark.ray
def test_cluster_operations_need_the_admin_key(base):
    with _client(base, KEY_A) as a, _client(base, ADMIN) as admin:
        forbidden = a.get("/metrics")
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
        assert "mosaic_streams" in admin.get("/metrics").text


@pytest.mark.ray
def test_stream_quota_is_429_with_retry_after_and_never_overshoots(base):
    with _client(base, KEY_C) as c:
        assert c.post("/v1/streams", json={"id": "q0"}).status_code == 201

        async def race() -> list[int]:  # one slot left, five creations at once: exactly one wins
            async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": KEY_C}, timeout=30) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/streams", json={"id": f"race{i}"}) for i in range(5)))
            return [r.status_code for r in rs]

        codes = asyncio.run(race())
        assert sorted(codes) == [201, 429, 429, 429, 429]
        over = c.post("/v1/streams", json={"id": "q-over"})
        assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
        assert over.headers["retry-after"] == "30"
        held = [s["id"] for s in c.get("/v1/streams").json()["streams"]]
        assert len(held) == QUOTA
        c.delete(f"/v1/streams/{held[1]}")
        assert c.post("/v1/streams", json={"id": "q1"}).status_code == 201  # a delete frees a slot
        with _client(base, KEY_A) as a:  # other tenants are not counted against gamma, nor it against them
            assert a.post("/v1/streams", json={"id": "q-other"}).status_code == 201
            a.delete("/v1/streams/q-other")
        for sid in ("q0", "q1"):
            c.delete(f"/v1/streams/{sid}")


@pytest.mark.ray
def test_frames_over_the_tenant_rate_are_429_and_change_nothing(base):
    burst = int(FPS * BURST_S)
    with _client(base, KEY_C) as c:
        c.post("/v1/streams", json={"id": "fast"})
        try:
            first = c.post("/v1/streams/fast/frames", content=frames_body(0, n=burst), headers=MSGPACK)
            assert first.status_code == 200, first.text  # the full bucket
            over = c.post("/v1/streams/fast/frames", content=frames_body(1, n=burst, ts0=5), headers=MSGPACK)
            assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
            wait = int(over.headers["retry-after"])
            assert 1 <= wait <= 2
            info = c.get("/v1/streams/fast").json()
            assert info["frames"] == burst and info["last_seq"] == 0
            time.sleep(BURST_S + 0.2)  # the bucket refills
            again = c.post("/v1/streams/fast/frames", content=frames_body(1, n=burst, ts0=5), headers=MSGPACK)
            assert again.status_code == 200 and c.get("/v1/streams/fast").json()["frames"] == 2 * burst
        finally:
            c.delete("/v1/streams/fast")


@pytest.mark.ray
def test_questions_over_the_tenant_budget_are_429_on_query_chat_and_websocket(base):
    """A question costs ceil(chars / 4) + max_tokens of the tenant's question tokens/s: delta's
    bucket holds 20 and refills at 2/s, so one question of 16 tokens passes and the next, on any
    path, is 429 with Retry-After (~8 s); another tenant is not held back. (The refill itself:
    tests/serve/test_limits.py.)"""
    import json

    from websockets.sync.client import connect

    ask = {"question": "what?", "max_tokens": 16}  # 2 + 16 = 18 tokens
    with _client(base, KEY_D) as d, _client(base, KEY_A) as a:
        for c in (d, a):
            c.post("/v1/streams", json={"id": "qbudget"})
        try:
            assert d.post("/v1/streams/qbudget/query", json=ask).status_code == 200
            over = d.post("/v1/streams/qbudget/query", json=ask)
            assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(over.headers["retry-after"]) <= 10 and "question tokens" in over.json()["error"]["message"]
            chat = d.post("/v1/chat/completions", json={"model": "qbudget", "max_tokens": 16,
                                                        "messages": [{"role": "user", "content": "what?"}]})
            assert chat.status_code == 429
            ws_url = base.replace("http", "ws", 1) + "/v1/realtime?stream_id=qbudget"
            with connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY_D}"}) as ws:
                json.loads(ws.recv())  # session.created
                ws.send(json.dumps({"type": "response.create", "response": {"question": "what?", "max_tokens": 16}}))
                event = json.loads(ws.recv())
                while event["type"] not in ("error", "response.created"):
                    event = json.loads(ws.recv())
                assert event["type"] == "error" and event["error"]["code"] == "rate_limited", event
            for _ in range(3):  # alpha has no question budget
                assert a.post("/v1/streams/qbudget/query", json=ask).status_code == 200
        finally:
            for c in (d, a):
                c.delete("/v1/streams/qbudget")


@pytest.mark.ray
def test_ownership_survives_a_router_restart(base, ray_cluster):
    with _client(base, KEY_A) as a, _client(base, KEY_B) as b:
        a.post("/v1/streams", json={"id": "kept"})
        a.post("/v1/streams/kept/frames", content=frames_body(0), headers=MSGPACK)
        router = ray_cluster.get_actor("authtest:router", namespace="mosaic_ray")
        ray_cluster.kill(router, no_restart=False)  # Ray restarts it; it re-reads the stream map
        deadline = time.monotonic() + 30
        while True:
            listed = a.get("/v1/streams")
            if listed.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert [s["id"] for s in listed.json()["streams"]] == ["kept"]
        assert b.get("/v1/streams/kept").status_code == 404
        assert a.get("/v1/streams/kept").json()["frames"] == 1
        a.delete("/v1/streams/kept")


# ---------------------------------------------------------------------- without Ray
def test_keys_come_from_the_config_and_the_environment():
    env = {"MOSAIC_API_KEYS": f" {KEY_A}:alpha , {KEY_B}:beta,", "MOSAIC_ADMIN_KEY": ADMIN}
    auth = Authenticator(AuthSpec(keys={KEY_C: "gamma"}), env)
    assert auth.enabled and auth.tenants == {"alpha", "beta", "gamma"}
    assert auth.identify(KEY_B) == Caller("beta", admin=False)
    assert auth.identify(KEY_C) == Caller("gamma", admin=False)
    assert auth.identify(ADMIN) == Caller(None, admin=True)
    with pytest.raises(Exception, match="API key is required"):
        auth.identify(None)
    with pytest.raises(Exception, match="API key is not valid"):
        auth.identify("wrong-key-0123456789abcdef")
    assert auth.identify_optional(None) is None
    assert not Authenticator(AuthSpec(), {}).enabled
    assert Authenticator(AuthSpec(), {}).identify(None) is OPEN


def test_the_key_a_request_presents():
    """fastapi.security reads it: a Bearer token (any case of the scheme), else X-API-Key; only a
    WebSocket also reads ?api_key=. The OpenAPI schema lists both schemes; /health's key is optional."""
    from mosaic_ray.serve.app import api

    app = FastAPI()

    @app.get("/key")
    async def key(k: str | None = Depends(presented_key)) -> dict:
        return {"key": k}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, k: str | None = Depends(presented_ws_key)) -> None:
        await websocket.accept()
        await websocket.send_json({"key": k})
        await websocket.close()

    with TestClient(app) as c:
        def got(headers: dict, **params: str) -> str | None:
            return c.get("/key", headers=headers, params=params).json()["key"]

        assert got({"Authorization": f"Bearer {KEY_A}"}) == got({"Authorization": f"bearer {KEY_A}"}) == KEY_A
        assert got({"X-API-Key": KEY_C}) == got({"x-api-key": KEY_C}) == KEY_C
        assert got({"Authorization": f"Bearer {KEY_A}", "X-API-Key": KEY_C}) == KEY_A
        assert got({"Authorization": "Basic dXNlcjpwdw==", "X-API-Key": KEY_C}) == KEY_C  # not a bearer
        assert got({"Authorization": "Bearer", "X-API-Key": KEY_C}) == KEY_C  # a blank token is none
        assert got({}) is None and got({}, api_key=KEY_A) is None  # plain HTTP never reads the query
        with c.websocket_connect(f"/ws?api_key={KEY_A}") as sock:
            assert sock.receive_json()["key"] == KEY_A
    schema = api.openapi()
    assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    assert schema["paths"]["/v1/streams"]["get"]["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]
    assert {} in schema["paths"]["/health"]["get"]["security"]


@pytest.mark.parametrize("value", ["short:alpha", f"{KEY_A}:bad tenant", f"{KEY_A}:", KEY_A])
def test_bad_environment_keys_are_refused_without_echoing_them(value):
    with pytest.raises(ValueError) as err:
        parse_env_keys(value)
    assert KEY_A not in str(err.value) and "short" not in str(err.value)


def test_bad_config_keys_are_refused_without_echoing_them():
    with pytest.raises(ValueError) as err:
        AuthSpec(keys={"short-key": "alpha"})
    assert "short-key" not in str(err.value)
    with pytest.raises(ValueError):
        AuthSpec(keys={KEY_A: "has:colon"})
    with pytest.raises(ValueError, match="admin key must differ"):
        AuthSpec(keys={KEY_A: "alpha"}, admin_key=KEY_A)


def test_a_tenant_names_only_ids_inside_its_prefix():
    alpha = Caller("alpha", admin=False)
    assert alpha.internal("cam") == "alpha:cam" and alpha.external("alpha:cam") == "cam"
    assert alpha.internal("beta:cam") == "alpha:beta:cam"  # never beta's stream
    assert alpha.owns("alpha:x") and not alpha.owns("alphabet:x") and not alpha.owns("beta:alpha:x")
    assert OPEN.internal("alpha:cam") == "alpha:cam" and OPEN.owns("anything")


def test_the_auth_example_config_reads_its_keys_from_the_environment():
    from pathlib import Path

    from mosaic_ray.serve.command import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "cluster_configs" / "local_auth.yaml")
    assert cfg.app.auth.keys == {} and cfg.app.auth.limits_of("globex").max_streams == 4
    auth = Authenticator(cfg.app.auth, {"MOSAIC_API_KEYS": f"{KEY_A}:acme", "MOSAIC_ADMIN_KEY": ADMIN})
    assert auth.identify(KEY_A).tenant == "acme"
