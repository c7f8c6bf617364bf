"""Every error the HTTP API returns is JSON `{"error": {"code", "message"}}` with a fitting status.

Engine and runtime errors carry their own `code` and `status` (`EngineError`); the ingress adds
the ones only HTTP has (body too large, unsupported media type, malformed body). Validation
failures are 422, except a body that is not even JSON (400). A 429 or 503 carries `Retry-After`
(whole seconds, as HTTP defines it); a 401 carries `WWW-Authenticate: Bearer`.

What a message may show (`public_message`): a client learns what was wrong with its request, never
how the service is built. So a 500 (an engine failure, a failed move, anything unexpected) gets
the stable message of its code, its details going to the server log only; every other message has
shard and actor names, memory addresses and the caller's tenant prefix (`tenant:` of internal ids)
removed, so the ids in it are the ones the caller sent.
"""

from __future__ import annotations

import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mosaic_ray.engine.interface import EngineError
from mosaic_ray.runtime.errors import unwrap_ray_error

log = logging.getLogger("mosaic_ray.serve")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    408: "request_timeout",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(Exception):
    """An HTTP-level refusal; `code` and `status` as in `EngineError`."""

    code = "bad_request"
    status = 400


class MalformedBodyError(ApiError):
    code = "malformed_body"
    status = 400


class PayloadTooLargeError(ApiError):
    code = "payload_too_large"
    status = 413


class QuestionTooLongError(ApiError):
    """A question over `ingress.max_question_chars`: refused before it reaches a tokenizer."""

    code = "question_too_long"
    status = 413


class RequestTimeoutError(ApiError):
    """A request body that did not arrive in time (`body_limit.py`)."""

    code = "request_timeout"
    status = 408


class UnsupportedMediaTypeError(ApiError):
    code = "unsupported_media_type"
    status = 415


class UnauthorizedError(ApiError):
    """No API key, or one that is not configured."""

    code = "unauthorized"
    status = 401


class ForbiddenError(ApiError):
    """A valid key without the right: cluster operations need the admin key."""

    code = "forbidden"
    status = 403


class RateLimitedError(ApiError):
    """A tenant is over one of its limits (`TenantLimits`); retry after `retry_after_s`."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s)
        self.message, self.retry_after_s = message, retry_after_s

    def __str__(self) -> str:
        return self.message


RETRY_STATUSES = (429, 503)


# An error message may quote what the client sent (a field name, a stream id): bounded, and with
# anything JSON cannot carry as UTF-8 (a lone surrogate) escaped, so the error itself cannot fail.
MAX_MESSAGE_CHARS = 1000


def _safe_message(message: str) -> str:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


# The message of every 500, by code: what failed, in words that hold whatever the cause.
STABLE_MESSAGES = {
    "engine_failure": "the engine failed on this request; the failure is logged",
    "migration_failed": "moving the stream failed; it stays where it was",
    "stream_data_lost": "the stream could not be rebuilt from its log",
    "internal_error": "internal error; the failure is logged",
}
# `<runtime>:shard:<n>`, `<runtime>:router` (Ray actor names) and `0x7f...` (a repr's address).
_SHARD_NAME = re.compile(r"(?:shard )?[\w.-]+:shard:\d+\b")
_ROUTER_NAME = re.compile(r"[\w.-]+:router\b")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{4,}\b")


def public_message(status: int, code: str, message: str, hide_prefix: str | None = None) -> str:
    """What a client is shown of `message` (see the module docstring)."""
    if status >= 500 and status != 503:
        return STABLE_MESSAGES.get(code, STABLE_MESSAGES["internal_error"])
    if hide_prefix:
        message = message.replace(hide_prefix, "")
    message = _ROUTER_NAME.sub("the router", _SHARD_NAME.sub("a shard", message))
    return _ADDRESS.sub("0x...", message)


def error_response(status: int, code: str, message: str, retry_after_s: float | None = None) -> JSONResponse:
    message = _safe_message(message)
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers or None)


def response_for(exc: BaseException, hide_prefix: str | None = None) -> JSONResponse:
    """The JSON error for an exception raised while serving a request (Ray wrappers removed);
    `hide_prefix` is the caller's tenant prefix, removed from the message."""
    exc = unwrap_ray_error(exc)
    if isinstance(exc, (EngineError, ApiError)):
        retry = getattr(exc, "retry_after_s", 1.0) if exc.status in RETRY_STATUSES else None
        if exc.status >= 500 and exc.status != 503:
            log.error("request failed: %s: %s", exc.code, exc)
        return error_response(exc.status, exc.code, public_message(exc.status, exc.code, str(exc), hide_prefix), retry)
    log.exception("unexpected error", exc_info=exc)
    return error_response(500, "internal_error", STABLE_MESSAGES["internal_error"])


def caller_prefix(request: Request) -> str | None:
    """The tenant prefix of the request's caller, once a route's key check has named it."""
    caller = getattr(request.state, "caller", None)
    return getattr(caller, "prefix", None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_body", "request body is not valid JSON")
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors[:5]]
        return error_response(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, public_message(exc.status_code, code, str(exc.detail)))

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        return response_for(exc, caller_prefix(request))

    # Known kinds get handlers of their own: Starlette answers them without re-raising. The
    # catch-all `Exception` handler answers too, but the server then logs a traceback.
    for kind in (EngineError, ApiError, RayError, Exception):
        app.add_exception_handler(kind, _known)

