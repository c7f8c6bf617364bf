"""When a client request is tried again, and after how long.

- 503 and 429 (the server is busy, a stream is moving or being rebuilt after its shard died, the
  router restarts, the server is shutting down): always retried, after the server's Retry-After
  when it gives one, else after an exponential backoff. The server did not act on the request.
- The connection could not be made (`httpx.ConnectError`, `ConnectTimeout`): always retried; the
  request never left.
- The connection broke after the request was sent (read timeout, reset): retried only when the
  request is idempotent. Frame batches are (the server acknowledges a repeated seq without adding
  its frames again), stream creation with a client-chosen id is; a question is not (its Q/A would
  join the stream's context twice).

tenacity runs the attempts (`RetryPolicy.retrying`): it stops after `max_attempts`, sleeps
between them, and calls `before_sleep` before each sleep. What is ours: which outcomes are retried
(above) and the wait, the server's Retry-After (seconds; capped) or else tenacity's
`wait_exponential`. After the last attempt the caller gets its outcome: the last response, or the
last exception raised again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception, retry_if_result, stop_after_attempt,
                      wait_exponential)
from tenacity.wait import wait_base

RETRY_STATUSES = frozenset({429, 503})


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    # A stream migration holds requests for well under a second; a router restart takes ~1-3 s;
    # a stream whose shard died answers 503 with Retry-After 2 s while it is rebuilt from its log
    # (goal: < 30 s; measured ~1-3 s, docs/reliability.md). 20 attempts ride out ~40 s of
    # Retry-After 2 s, or more with backoff up to 8 s, before giving up.
    max_attempts: int = 20
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    # Never wait longer than this for one Retry-After, whatever the server asks.
    max_retry_after_s: float = 30.0

    def retrying(self, idempotent: bool, before_sleep: Callable[[RetryCallState], None] | None = None) -> AsyncRetrying:
        """tenacity's runner of one request: `await policy.retrying(...)(send)`, where `send`
        returns an `httpx.Response` (any status) or raises."""
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=WaitRetryAfter(self.max_retry_after_s, wait_exponential(self.backoff_s, max=self.max_backoff_s)),
            retry=retry_if_result(lambda r: r.status_code in RETRY_STATUSES)
            | retry_if_exception(lambda exc: retryable_error(exc, idempotent)),
            before_sleep=before_sleep,
            retry_error_callback=lambda state: state.outcome.result(),  # the last response, or raise
        )


def retryable_error(exc: BaseException, idempotent: bool) -> bool:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return True
    return idempotent and isinstance(exc, httpx.TransportError)


class WaitRetryAfter(wait_base):
    """The seconds of the last response's Retry-After (at most `cap`), else `fallback`'s wait (an
    exception, no header, or an HTTP date, which is not read)."""

    def __init__(self, cap: float, fallback: wait_base) -> None:
        self.cap, self.fallback = cap, fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            header = outcome.result().headers.get("retry-after")
            try:
                return min(max(float(header), 0.0), self.cap)
            except (TypeError, ValueError):
                pass
        return self.fallback(retry_state)
