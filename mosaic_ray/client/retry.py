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
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

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

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempts count from 0)."""
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_retry_after_s)
            except ValueError:
                pass  # an HTTP date: fall back to backoff
        return min(self.backoff_s * (2**attempt), self.max_backoff_s)

    def retryable(self, outcome: httpx.Response | Exception, idempotent: bool) -> bool:
        if isinstance(outcome, httpx.Response):
            return outcome.status_code in RETRY_STATUSES
        if isinstance(outcome, (httpx.ConnectError, httpx.ConnectTimeout)):
            return True
        return idempotent and isinstance(outcome, httpx.TransportError)
