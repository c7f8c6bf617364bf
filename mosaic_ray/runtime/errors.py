"""Errors the runtime adds to the engine's (`mosaic_ray.engine.interface.EngineError`).

They share the engine's contract: a class-level `code` and HTTP `status`, and a raise leaves the
stream as it was. Every constructor argument is kept in `args`, so the errors survive pickling
across Ray (Ray re-raises an actor's exception as `RayTaskError` whose `cause` is the original).
"""

from __future__ import annotations

from ray.exceptions import RayTaskError

from mosaic_ray.engine.interface import EngineError


class StreamMovedError(EngineError):
    """The stream left this shard for `shard`; the caller retries there. Meant never to reach a
    client; if it does (the new home vanished too), 503 tells the client to retry."""

    code = "stream_moved"
    status = 503

    def __init__(self, stream_id: str, shard: str) -> None:
        super().__init__(stream_id, shard)
        self.stream_id, self.shard = stream_id, shard

    def __str__(self) -> str:
        return f"stream {self.stream_id!r} moved to shard {self.shard!r}"


class RetryLaterError(EngineError):
    """Base of the errors a client answers by retrying after `retry_after_s` (sent as Retry-After)."""

    default_retry_after_s = 1.0

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        retry_after_s = self.default_retry_after_s if retry_after_s is None else retry_after_s
        super().__init__(message, retry_after_s)
        self.message, self.retry_after_s = message, retry_after_s

    def __str__(self) -> str:
        return self.message


class ShardBusyError(RetryLaterError):
    """The shard's ingest queue is full, the stream is held longer than allowed, or the shard's
    measured capacity takes no new stream (`runtime/actors/capacity.py`); retry later."""

    code = "overloaded"
    status = 503


class QuotaExceededError(RetryLaterError):
    """A tenant holds as many streams as it may (`TenantLimits.max_streams`); nothing was created."""

    code = "quota_exceeded"
    status = 429
    default_retry_after_s = 30.0


class StreamRecoveringError(RetryLaterError):
    """The stream's shard died; the router is rebuilding it on a live shard from its frame log.
    Nothing acknowledged is lost: retry after `retry_after_s`."""

    code = "stream_recovering"
    status = 503
    default_retry_after_s = 2.0


class ShuttingDownError(RetryLaterError):
    """The runtime is stopping (SIGTERM): no new work is taken; retry against its successor."""

    code = "shutting_down"
    status = 503
    default_retry_after_s = 5.0


class MalformedFrameError(EngineError):
    """A frame's image data cannot be decoded."""

    code = "malformed_body"
    status = 400


class SeqConflictError(EngineError):
    """A frame batch's seq is below the stream's last acknowledged seq (the same seq is a replay)."""

    code = "seq_conflict"
    status = 409


class ShardUnavailableError(EngineError):
    """The shard owning the stream is dead or unreachable."""

    code = "shard_unavailable"
    status = 503


class EngineFailedError(EngineError):
    """The engine is broken: it raised something other than an `EngineError` and then failed its
    probe on a known-good input too (`EngineGuard.failure`), or it hung. The shard fails its
    health check from then on."""

    code = "engine_failure"
    status = 500


class RequestFailedError(EngineError):
    """The engine raised something other than an `EngineError` on this request, and then passed
    its probe on a known-good input: the request failed alone, the engine is healthy."""

    code = "request_failed"
    status = 500


class StreamQuarantinedError(EngineError):
    """A record of the stream's log cannot be replayed: it fails validation (`record_check.py`),
    or the engine fails on it while it passes its probe. The stream is not served (never half
    rebuilt) until deleted; the shard that tried, and every other stream, are unaffected."""

    code = "stream_quarantined"
    status = 500


class MigrationError(EngineError):
    """A stream could not be moved; it stays, intact, on its source shard."""

    code = "migration_failed"
    status = 500


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The exception an actor raised, out of Ray's `RayTaskError` wrapper (others as they are)."""
    while isinstance(exc, RayTaskError) and exc.cause is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


class SnapshotLostError(EngineError):
    """A stream's log was compacted and the snapshot holding its start is unreadable or missing:
    the acknowledged records before the snapshot are lost. The router quarantines the stream (500
    until deleted) rather than serve a stream missing its start."""

    code = "stream_data_lost"
    status = 500
