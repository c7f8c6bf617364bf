"""Per-tenant rate limits: token buckets for frames/s, bytes/s and question tokens/s, refused with
429 + Retry-After.

Each ingress replica keeps its own buckets and grants `1 / num_replicas` of every configured rate
(Serve spreads requests evenly over replicas), so a tenant's rate over the whole app stays within
the configured one; with uneven spreading a tenant is refused a little early, never let through
late. The stream-count limit is the router's (`Router.create_stream(quota=...)`): it must count
every replica's creations, so it lives where the map does.

Invariants:
- A charge is all or nothing: a request refused on bytes takes no frame tokens either.
- A request larger than a bucket's capacity passes only from a full bucket and leaves it in debt,
  so no batch size is refused forever and the long-run rate never exceeds the configured one.
- `refund` gives back exactly what `charge` took (a request the runtime then refused, 503 or 4xx,
  costs the tenant nothing).

Why not the `limits` library (5.8: fixed, moving and sliding-window counters over `MemoryStorage`):
it has no token bucket, so budget comes back only when a whole window's hits expire, not
continuously at the rate; its limits are whole counts per whole seconds (a replica's half of 5
frames/s, 2.5, silently becomes 2), and it refuses a hit larger than the limit forever instead of
letting it through into debt. It can neither give a refused request's tokens back nor run on
our clock (tests drive a fake one; it reads `time.time()`), so these ~40 lines stay ours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from mosaic_ray.serve.config import AuthSpec
from mosaic_ray.serve.errors import RateLimitedError


# Characters per prompt token for a question's cost, before any tokenizer runs: ~4 for English
# with BPE tokenizers (SmolLM2, Qwen2); an estimate, so the budget is a rate, not an exact count.
CHARS_PER_TOKEN = 4
KINDS = ("frames", "bytes", "question_tokens")  # TenantLimits.<kind>_per_s


def question_cost(params: dict[str, Any]) -> int:
    """What a question (`schemas.engine_ask`'s parameters) costs a tenant's question budget: its
    estimated prompt tokens plus the tokens it may generate."""
    return math.ceil(len(params.get("question", "")) / CHARS_PER_TOKEN) + int(params.get("max_tokens") or 0)


class TokenBucket:
    """`rate` tokens per second, holding at most `capacity`; starts full."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"a token bucket needs rate > 0 and capacity > 0, got {rate}, {capacity}")
        self.rate, self.capacity = rate, capacity
        self._clock = clock
        self._tokens = capacity
        self._at = clock()

    def wait_s(self, n: float) -> float:
        """Seconds until `n` tokens may be taken (0: now)."""
        self._refill()
        need = min(n, self.capacity)
        return 0.0 if self._tokens >= need else (need - self._tokens) / self.rate

    def take(self, n: float) -> None:
        """Take `n` tokens (after `wait_s(n)` said 0); may leave the bucket in debt."""
        self._refill()
        self._tokens -= n

    def give(self, n: float) -> None:
        self._tokens = min(self.capacity, self._tokens + n)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now


class TenantLimiter:
    """Frames/s, bytes/s and question tokens/s of each tenant, by `AuthSpec` (its `limits`, or the tenant's override)."""

    def __init__(self, spec: AuthSpec, share: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self._spec, self._share, self._clock = spec, share, clock
        self._buckets: dict[tuple[str, str], TokenBucket | None] = {}

    def charge(self, tenant: str | None, frames: int = 0, nbytes: int = 0, question_tokens: int = 0) -> None:
        """Take `frames`, `nbytes` and `question_tokens` from the tenant's buckets, or raise
        `RateLimitedError` (taking nothing)."""
        if tenant is None:
            return
        wanted = [(b, n, what) for what, n in zip(KINDS, (frames, nbytes, question_tokens))
                  if n > 0 and (b := self._bucket(tenant, what)) is not None]
        waits = [(b.wait_s(n), what) for b, n, what in wanted]
        worst = max(waits, default=(0.0, ""))
        if worst[0] > 0:
            raise RateLimitedError(f"over the {worst[1].replace('_', ' ')}/s limit", worst[0])
        for b, n, _ in wanted:
            b.take(n)

    def refund(self, tenant: str | None, frames: int = 0, nbytes: int = 0, question_tokens: int = 0) -> None:
        if tenant is None:
            return
        for what, n in zip(KINDS, (frames, nbytes, question_tokens)):
            bucket = self._bucket(tenant, what)
            if bucket is not None and n > 0:
                bucket.give(n)

    def _bucket(self, tenant: str, what: str) -> TokenBucket | None:
        key = (tenant, what)
        if key not in self._buckets:
            limits = self._spec.limits_of(tenant)
            rate = getattr(limits, f"{what}_per_s")
            self._buckets[key] = None if rate is None else TokenBucket(
                rate * self._share, rate * self._share * limits.burst_s, self._clock)
        return self._buckets[key]
