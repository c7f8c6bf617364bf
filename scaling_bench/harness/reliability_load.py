"""Reliability under load, through HTTP: N streams push frames and ask questions for a fixed time,
optionally while a shard is killed; then every stream's acknowledged frames are compared with what
the server holds.

Clients are `AsyncMosaicClient`s (what users run): 503 and 429 are retried after the server's
Retry-After, a frame batch reuses its seq on retry. A transport wrapper counts every response the
server gave, so the 503 rate is the server's, not hidden by the client's retries.

Figures (`run_reliability_load(...)` returns them):
- frames_acked: frames of batches the server acknowledged; frames_stored: the streams' `frames`
  afterwards. Equal when nothing acknowledged was lost (and nothing duplicated).
- answer_ms: p50/p99/max of `ask` as the client saw it (retries included); answers, answer errors.
- responses, status counts, rate_503: 503 responses / all responses.
- recovery (with a kill): from the kill, every stream is asked a one-token question every
  `probe_every_s` by a client that does not retry; a stream whose probe failed at least once is
  one the kill reached (`affected`), and its recovery time is kill -> its first answer after.
  While a stream is probed, the load asks it nothing (one question per stream at a time: a
  second is 409 `stream_busy`); a probe that meets the load's own question (409) tries again and
  does not count as a failure.
  `recovery_s` is the slowest affected stream's (what "its streams answer again" means).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np

from mosaic_ray.client.client import AsyncMosaicClient
from mosaic_ray.client.errors import MosaicAPIError
from mosaic_ray.client.retry import RetryPolicy
from scaling_bench.harness.stats import pct


@dataclass(slots=True)
class ReliabilityLoadSpec:
    streams: int = 4
    seconds: float = 5.0
    fps: float = 8.0  # frames per second per stream (paced)
    batch_frames: int = 4
    question_every_s: float = 1.0  # per stream
    max_tokens: int = 8
    frame_size: int = 64
    kill_after_s: float | None = None  # kill a shard this long into the load (needs `kill`)
    probe_every_s: float = 0.25  # after a kill: how often each stream is asked until it answers
    probe_timeout_s: float = 180.0  # a stream not answering this long after the kill counts as lost
    prefix: str = "rl"

    def __post_init__(self) -> None:
        if self.streams < 1 or self.seconds <= 0 or self.fps <= 0 or self.batch_frames < 1:
            raise ValueError(f"invalid load spec: {self}")


class CountingTransport(httpx.AsyncBaseTransport):
    """Counts the status of every response that reaches the client."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.statuses: collections.Counter[int] = collections.Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self._inner.handle_async_request(request)
        self.statuses[resp.status_code] += 1
        return resp

    async def aclose(self) -> None:
        await self._inner.aclose()


async def run_reliability_load(
    url: str, spec: ReliabilityLoadSpec, kill: Callable[[], Awaitable[str]] | None = None,
    inspect: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The load, then the figures above; `inspect()` (after the load, before the streams are
    deleted) adds what the runtime says of itself (the router's recovery status, snapshots)."""
    transport = CountingTransport()
    retry = RetryPolicy(max_attempts=40, max_retry_after_s=5.0)  # rides out a recovery (< 30 s)
    rng = np.random.default_rng(0)
    palette = [rng.integers(0, 256, (spec.frame_size, spec.frame_size, 3), dtype=np.uint8) for _ in range(16)]
    acked: dict[str, int] = {}
    answer_s: list[float] = []
    errors: list[str] = []
    killed: dict[str, Any] = {}
    probing: set[str] = set()  # streams the recovery probe is asking (the load leaves them alone)
    async with AsyncMosaicClient(url, retry=retry, transport=transport, timeout_s=60) as client:
        tag = f"{spec.prefix}-{int(time.time() * 1e3) % 10**8}"
        sids = [await client.create_stream(f"{tag}-{i}") for i in range(spec.streams)]
        start = time.monotonic()
        deadline = start + spec.seconds

        async def ingest(sid: str) -> None:
            seq, n = 0, 0
            period = spec.batch_frames / spec.fps
            while time.monotonic() < deadline:
                frames = [palette[(n + i) % len(palette)] for i in range(spec.batch_frames)]
                stamps = [(n + i) / spec.fps for i in range(spec.batch_frames)]
                try:
                    await client.push_frames(sid, frames, stamps, seq=seq)
                except Exception as exc:
                    errors.append(f"push {sid}: {exc}")
                    return
                n += spec.batch_frames
                acked[sid] = n
                seq += 1
                await asyncio.sleep(max(0.0, start + n / spec.fps - time.monotonic() - period / 2))

        async def questions(sid: str) -> None:
            k = 0
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                if sid in probing:
                    await asyncio.sleep(spec.probe_every_s)
                    continue
                try:
                    await client.ask(sid, f"what happened? ({k})", max_tokens=spec.max_tokens)
                    answer_s.append(time.monotonic() - t0)
                except MosaicAPIError as exc:
                    if exc.code == "stream_busy" and killed:  # the probe got there first
                        continue
                    errors.append(f"ask {sid}: {exc}")
                except Exception as exc:
                    errors.append(f"ask {sid}: {exc}")
                k += 1
                await asyncio.sleep(max(0.0, spec.question_every_s - (time.monotonic() - t0)))

        async def chaos() -> None:
            await asyncio.sleep(spec.kill_after_s)
            probing.update(sids)
            killed["shard"] = await kill()
            t_kill = time.monotonic()
            killed["at_s"] = t_kill - start
            async with AsyncMosaicClient(url, retry=RetryPolicy(max_attempts=1), timeout_s=30) as probe:
                waits = await asyncio.gather(*(_answers_again(probe, sid, t_kill, spec, probing) for sid in sids))
            hit = {sid: w for sid, (w, failed) in zip(sids, waits) if failed}
            killed["affected_streams"] = len(hit)
            killed["recovery_s_each"] = {sid: None if w is None else round(w, 2) for sid, w in sorted(hit.items())}
            known = [w for w in hit.values() if w is not None]
            killed["recovery_s"] = round(max(known), 2) if known and len(known) == len(hit) else None
            killed["recovery_p50_s"] = round(float(np.median(known)), 2) if known else None
            killed["never_answered"] = sorted(sid for sid, w in hit.items() if w is None)

        tasks = [ingest(s) for s in sids]
        if spec.question_every_s > 0:
            tasks += [questions(s) for s in sids]
        if kill is not None and spec.kill_after_s is not None:
            tasks.append(chaos())
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
        stored: dict[str, int | None] = {}
        for sid in sids:  # a stream that cannot answer (quarantined, lost) is reported, not raised
            try:
                stored[sid] = (await client.stream_info(sid))["frames"]
            except MosaicAPIError as exc:
                stored[sid] = None
                errors.append(f"info {sid}: {exc}")
        if inspect is not None:
            killed["runtime"] = await inspect()
        for sid in sids:
            try:
                await client.delete_stream(sid)
            except MosaicAPIError as exc:
                errors.append(f"delete {sid}: {exc}")
    responses = sum(transport.statuses.values())
    return {
        "spec": asdict(spec),
        "elapsed_s": round(elapsed, 2),
        "frames_acked": sum(acked.values()),
        "frames_stored": sum(v or 0 for v in stored.values()),
        "lost_streams": sorted(s for s in sids if stored.get(s) != acked.get(s, 0)),
        "answers": len(answer_s),
        "answer_ms": {"p50": _ms(pct(answer_s, 0.5)), "p99": _ms(pct(answer_s, 0.99)),
                      "max": _ms(max(answer_s, default=0.0))},
        "responses": responses,
        "statuses": dict(sorted(transport.statuses.items())),
        "rate_503": round(transport.statuses[503] / responses, 4) if responses else 0.0,
        "client_retries": client.retries,
        "errors": len(errors),
        "first_errors": errors[:8],
        "killed": killed,
    }


async def _answers_again(probe: AsyncMosaicClient, sid: str, t_kill: float, spec: ReliabilityLoadSpec,
                         probing: set[str]) -> tuple[float | None, bool]:
    """(seconds from the kill to `sid`'s first answer, whether an ask failed before it); the
    seconds are None if it never answered within `probe_timeout_s`."""
    failed = False
    try:
        while (now := time.monotonic()) - t_kill < spec.probe_timeout_s:
            try:
                await probe.ask(sid, "still there?", max_tokens=1)
                return time.monotonic() - t_kill, failed
            except MosaicAPIError as exc:
                failed = failed or exc.code != "stream_busy"  # busy: the load's question, in flight
            except Exception:
                failed = True
            await asyncio.sleep(max(0.0, spec.probe_every_s - (time.monotonic() - now)))
        return None, failed
    finally:
        probing.discard(sid)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)
