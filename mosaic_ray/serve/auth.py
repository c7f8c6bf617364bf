"""Who is calling: API keys -> tenants, and each tenant's view of stream ids.

A request names its key as `Authorization: Bearer <key>` (what OpenAI clients send) or
`X-API-Key: <key>`; a WebSocket may also give `?api_key=<key>` (browsers cannot set its headers).
FastAPI's security classes read them (`HTTPBearer`, `APIKeyHeader`, `APIKeyQuery`, all with
`auto_error=False`: a missing key is ours to refuse, with our 401 body), and list both schemes in
the OpenAPI schema of every route that depends on `presented_key`.
Keys come from `AuthSpec` (`config.py`) and from the environment (`MOSAIC_API_KEYS="k1:tenantA,
k2:tenantB"`, `MOSAIC_ADMIN_KEY`), read when the ingress replica starts.

Invariants:
- Auth is off exactly when no key is configured, in the config or the environment: every caller is
  then `OPEN`, which sees every stream under its own id, as before auth existed.
- A tenant's streams are named `tenant:id` inside the runtime (router, stream map, shards, frame
  logs); the tenant sends and sees only `id`. A tenant can name nothing outside its own prefix, so
  another tenant's stream is, to it, a stream that does not exist: the same 404, and a create with
  the same id makes a different stream (201), so not even existence leaks. Ownership lives in the
  id itself, so it is persisted wherever ids are (the router's `StreamMap`) and survives restarts.
- The admin key is no tenant: it names internal ids as they are (`tenantA:cam-1`), sees every
  stream, and alone may call cluster operations (`/metrics`).
- Keys are compared through their SHA-256 digests, never logged or echoed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Security
from fastapi.security import APIKeyHeader, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer

from mosaic_ray.serve.config import AuthSpec, check_key, check_tenant
from mosaic_ray.serve.errors import ForbiddenError, UnauthorizedError

SEPARATOR = ":"  # between a tenant and its stream id; tenant names never contain it


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller. `tenant` None: unscoped (the admin, or anyone while auth is off)."""

    tenant: str | None
    admin: bool

    def internal(self, stream_id: str) -> str:
        """The runtime's id of the stream the caller names `stream_id`."""
        return stream_id if self.tenant is None else f"{self.tenant}{SEPARATOR}{stream_id}"

    def external(self, stream_id: str) -> str:
        """The caller's name for the runtime's stream `stream_id` (which it must own)."""
        return stream_id if self.tenant is None else stream_id[len(self.tenant) + 1:]

    def owns(self, stream_id: str) -> bool:
        return self.tenant is None or stream_id.startswith(f"{self.tenant}{SEPARATOR}")

    @property
    def prefix(self) -> str | None:
        """The prefix of every internal id this caller may create (None: any)."""
        return None if self.tenant is None else f"{self.tenant}{SEPARATOR}"

    def require_admin(self) -> None:
        if not self.admin:
            raise ForbiddenError("this operation needs the admin key")


OPEN = Caller(tenant=None, admin=True)

BEARER = HTTPBearer(auto_error=False, description="An API key as `Authorization: Bearer <key>`")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key")
API_KEY_QUERY = APIKeyQuery(name="api_key", auto_error=False)  # WebSockets only


def _key(bearer: HTTPAuthorizationCredentials | None, *others: str | None) -> str | None:
    """The bearer token, else the first other key given; blank counts as none."""
    for key in (bearer.credentials if bearer is not None else None, *others):
        if key and key.strip():
            return key.strip()
    return None


async def presented_key(bearer: HTTPAuthorizationCredentials | None = Security(BEARER),
                        header: str | None = Security(API_KEY_HEADER)) -> str | None:
    """The key an HTTP request presents (a FastAPI dependency); None without one. An
    `Authorization` of another scheme than Bearer is no key (`X-API-Key` is then read)."""
    return _key(bearer, header)


async def presented_ws_key(bearer: HTTPAuthorizationCredentials | None = Security(BEARER),
                           header: str | None = Security(API_KEY_HEADER),
                           query: str | None = Security(API_KEY_QUERY)) -> str | None:
    """`presented_key` of a WebSocket, which may also give `?api_key=`."""
    return _key(bearer, header, query)


def parse_env_keys(value: str) -> dict[str, str]:
    """`"key1:tenantA, key2:tenantB"` -> {key: tenant}; raises ValueError naming the bad item's
    position (never the key)."""
    out: dict[str, str] = {}
    for i, item in enumerate(p.strip() for p in value.split(",")):
        if not item:
            continue
        key, sep, tenant = item.rpartition(SEPARATOR)
        if not sep:
            raise ValueError(f"item {i} of the API key list is not 'key:tenant'")
        try:
            out[check_key(key)] = check_tenant(tenant)
        except ValueError as exc:
            raise ValueError(f"item {i} of the API key list: {exc}") from None
    return out


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class Authenticator:
    def __init__(self, spec: AuthSpec, environ: Mapping[str, str] = os.environ) -> None:
        keys = {**parse_env_keys(environ.get(spec.keys_env, "")), **spec.keys}
        admin = spec.admin_key or environ.get(spec.admin_key_env) or None
        if admin is not None:
            check_key(admin)
            if admin in keys:
                raise ValueError("the admin key must differ from every tenant key")
        self._tenants = {_digest(k): t for k, t in keys.items()}
        self._admin = _digest(admin) if admin is not None else None
        self.enabled = bool(self._tenants) or self._admin is not None

    @property
    def tenants(self) -> set[str]:
        return set(self._tenants.values())

    def identify(self, key: str | None) -> Caller:
        """The caller `key` (from `presented_key`) names; `UnauthorizedError` when missing or unknown."""
        if not self.enabled:
            return OPEN
        if key is None:
            raise UnauthorizedError("an API key is required: 'Authorization: Bearer <key>' or 'X-API-Key'")
        digest = _digest(key)
        if digest == self._admin:
            return Caller(tenant=None, admin=True)
        tenant = self._tenants.get(digest)
        if tenant is None:
            raise UnauthorizedError("the API key is not valid")
        return Caller(tenant=tenant, admin=False)

    def identify_optional(self, key: str | None) -> Caller | None:
        """None for a request without credentials; otherwise as `identify` (a wrong key is 401)."""
        if self.enabled and key is None:
            return None
        return self.identify(key)
