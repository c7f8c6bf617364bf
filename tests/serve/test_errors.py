"""Error bodies name the problem, never the service's insides (issue 20, item 11): no shard or
actor names, exception text, memory addresses or the caller's tenant prefix."""

from __future__ import annotations

import json

import pytest

from mosaic_ray.engine.interface import UnknownStreamError
from mosaic_ray.runtime.errors import EngineFailedError, MigrationError, ShardUnavailableError, StreamMovedError
from mosaic_ray.serve.errors import STABLE_MESSAGES, response_for

LEAKS = ("shard:", ":router", "0x7f", "RuntimeError", "tenantA:", "secret")


def _body(exc: BaseException, prefix: str | None = None) -> tuple[int, dict]:
    r = response_for(exc, prefix)
    return r.status_code, json.loads(r.body)["error"]


@pytest.mark.parametrize("exc,status,code", [
    (EngineFailedError("engine failed: RuntimeError: secret <Model object at 0x7f3a2b1c0d00> on mosaic:shard:1"),
     500, "engine_failure"),
    (MigrationError("moving 'tenantA:cam' from mosaic:shard:0 to mosaic:shard:1 failed: RuntimeError: secret"),
     500, "migration_failed"),
    (ValueError("secret at 0x7f3a2b1c0d00"), 500, "internal_error"),
])
def test_a_500_gets_its_codes_stable_message(exc, status, code):
    got, body = _body(exc, "tenantA:")
    assert (got, body["code"]) == (status, code)
    assert body["message"] == STABLE_MESSAGES[code]


@pytest.mark.parametrize("exc,shown", [
    (ShardUnavailableError("shard mosaic:shard:1 is unavailable"), "a shard is unavailable"),
    (ShardUnavailableError("mosaic:router is unavailable"), "the router is unavailable"),
    (StreamMovedError("tenantA:cam", "mosaic:shard:2"), "stream 'cam' moved to shard 'a shard'"),
    (UnknownStreamError("stream 'tenantA:cam-1' not found"), "stream 'cam-1' not found"),
])
def test_other_messages_lose_shard_names_addresses_and_the_tenant_prefix(exc, shown):
    _, body = _body(exc, "tenantA:")
    assert body["message"] == shown
    assert not any(leak in body["message"] for leak in LEAKS)
