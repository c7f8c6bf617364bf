"""Rebalancing measured on a live runtime: skew streams onto one shard, let the router move them,
time explicit moves, and check that a moved stream answers exactly as its unmoved twin.

Every measured stream has a twin opened on the same shard and fed the same frames, one engine call
at a time (calls that meet in one batch could round differently), so the two hold identical state.
Pair i starts at frame 7 x i of the clip, so pairs differ from each other.
Asking a question commits it to the stream, so identity is checked between a stream that moved and
its twin that never did, after every move: the same greedy question must give the same answer.

Used by scaling_bench/rebalance.py; everything goes through the router and `StreamDirectory`
(the shard actors directly, no HTTP).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mosaic_ray.runtime.config import LoadWeights

QUESTION = "What happens in the video so far?"


@dataclass(slots=True)
class SkewSpec:
    streams: int  # measured streams (each with a twin): 2 x streams on the skewed shard
    frames: int  # frames per stream
    batch: int  # frames per append call
    fps: float  # frames per second of stream time: duration = frames / fps
    migrations: int  # explicit `migrate` calls timed after the rebalance
    max_rounds: int  # rebalancing rounds at most (each moves up to max_migrations_per_round)
    max_tokens: int
    transport: str = "distributed"
    prefix: str = "rb"

    def pairs(self) -> list[tuple[str, str]]:
        return [(f"{self.prefix}{i}", f"{self.prefix}{i}-twin") for i in range(self.streams)]


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"  {msg}", flush=True)


async def skew(d: Any, shard: str, spec: SkewSpec, frames: list[np.ndarray], progress: bool) -> float:
    """Open every stream (and twin) on `shard` and feed it; returns the ingest wall seconds."""
    t0 = time.perf_counter()
    for i, pair in enumerate(spec.pairs()):
        for sid in pair:
            await d.ask_router("create_stream", sid, shard)
            for seq, k in enumerate(range(0, spec.frames, spec.batch)):
                n = min(spec.batch, spec.frames - k)
                await d.call(sid, "append_frames", seq, [frames[(7 * i + k + j) % len(frames)] for j in range(n)],
                             [(k + j) / spec.fps for j in range(n)])
        _say(progress, f"fed pair {i + 1}/{spec.streams} ({spec.frames} frames each), "
                       f"{time.perf_counter() - t0:.1f} s")
    return time.perf_counter() - t0


async def loads(d: Any, weights: LoadWeights) -> list[dict[str, Any]]:
    """Every healthy shard's `LoadReport`, with its score, by shard name."""
    reports = await d.ask_router("loads")
    rows = [{**dataclasses.asdict(r), "score": r.score(weights)} for r in reports]
    return sorted(rows, key=lambda r: r["shard"])


def imbalance(rows: list[dict[str, Any]], shards: list[str]) -> float:
    """max score / mean score over all shards (1.0: perfectly even; N: all on one of N shards)."""
    scores = {r["shard"]: r["score"] for r in rows}
    vals = [scores.get(s, 0.0) for s in shards]
    mean = sum(vals) / len(vals)
    return max(vals) / mean if mean else 0.0


async def rebalance(d: Any, spec: SkewSpec, progress: bool) -> dict[str, Any]:
    """Rounds of `router.rebalance()` until one moves nothing (or `max_rounds`)."""
    rounds, moves = [], []
    t0 = time.perf_counter()
    for _ in range(spec.max_rounds):
        r0 = time.perf_counter()
        done = await d.ask_router("rebalance")
        rounds.append({"moves": len(done), "wall_s": time.perf_counter() - r0})
        moves += done
        _say(progress, f"rebalance round {len(rounds)}: {len(done)} move(s) in {rounds[-1]['wall_s']:.2f} s")
        if not done:
            break
    return {"moves": moves, "rounds": rounds, "wall_s": time.perf_counter() - t0}


async def timed_move(d: Any, sid: str, target: str, spec: SkewSpec) -> dict[str, Any]:
    """One `router.migrate`, timed from here; bytes are the stream's KV (host pool + device)."""
    info = await d.call(sid, "stream_info")
    nbytes = int(info.get("kv_bytes_host", 0)) + int(info.get("kv_bytes_device", 0))
    t0 = time.perf_counter()
    res = await d.ask_router("migrate", sid, target, spec.transport)
    dt = time.perf_counter() - t0
    duration = int(info.get("frames") or spec.frames) / spec.fps  # the video the stream's KV holds
    return {"stream": sid, "source": res["source"], "target": res["target"], "transport": res["transport"],
            "seconds": dt, "kv_bytes": nbytes, "kv_bytes_host": int(info.get("kv_bytes_host", 0)),
            "kv_bytes_device": int(info.get("kv_bytes_device", 0)), "past_tokens": info.get("past_tokens"),
            "stream_duration_s": duration, "gb_per_s": nbytes / dt / 1e9 if dt else 0.0,
            "s_per_stream_hour": dt * 3600.0 / duration if duration else 0.0, "phases": res.get("phases", {})}


async def explicit_moves(d: Any, spec: SkewSpec, moved: set[str], shards: list[str],
                         progress: bool) -> list[dict[str, Any]]:
    """Move `spec.migrations` streams whose twin never moved, each to the shard with the fewest
    streams (not its own); the least moved first, so the moved-vs-unmoved pairs grow."""
    twin = {a: b for a, b in spec.pairs()} | {b: a for a, b in spec.pairs()}
    times = {s: int(s in moved) for s in twin}
    out = []
    for _ in range(spec.migrations):
        where = await d.ask_router("list_streams")
        cands = [s for s in sorted(twin) if twin[s] not in moved and s in where]
        cands.sort(key=lambda s: (times[s], s.endswith("-twin"), s))
        if not cands:
            break
        sid = cands[0]
        counts = {s: 0 for s in shards}
        for owner in where.values():
            counts[owner] = counts.get(owner, 0) + 1
        target = min((s for s in shards if s != where[sid]), key=lambda s: (counts[s], s))
        out.append(await timed_move(d, sid, target, spec))
        moved.add(sid)
        times[sid] += 1
        m = out[-1]
        _say(progress, f"migrate {sid} {m['source']} -> {m['target']}: {m['seconds']:.3f} s, "
                       f"{m['kv_bytes'] / 2**20:.1f} MiB, {m['gb_per_s']:.3f} GB/s")
    return out


async def identity(d: Any, spec: SkewSpec, moved: set[str]) -> list[dict[str, Any]]:
    """The same greedy question to both streams of every pair; answers must be equal. `kind`:
    moved_vs_unmoved (the check that counts), both_moved, or neither (a control)."""
    rows = []
    request = {"question": QUESTION, "max_tokens": spec.max_tokens, "temperature": 0.0}
    for a, b in spec.pairs():
        answers = [(await d.call(s, "answer", request))["text"] for s in (a, b)]
        n = (a in moved) + (b in moved)
        kind = {0: "neither", 1: "moved_vs_unmoved", 2: "both_moved"}[n]
        rows.append({"pair": [a, b], "kind": kind, "moved": [s for s in (a, b) if s in moved],
                     "answers": answers, "equal": answers[0] == answers[1]})
    return rows


async def measure(cfg: dict[str, Any], spec: SkewSpec, frames: list[np.ndarray], progress: bool) -> dict[str, Any]:
    """The whole run on the runtime of `cfg` (already started): skew, rebalance, moves, identity."""
    from mosaic_ray.runtime.config import RuntimeConfig
    from mosaic_ray.serve.directory import StreamDirectory

    rc = RuntimeConfig(**cfg)
    d = await StreamDirectory.connect(rc)
    shards = rc.shard_names
    ingest_s = await skew(d, shards[0], spec, frames, progress)
    before = await loads(d, rc.router.weights)
    reb = await rebalance(d, spec, progress)
    after = await loads(d, rc.router.weights)
    moved = {m["id"] for m in reb["moves"]}
    moves = await explicit_moves(d, spec, moved, shards, progress)
    final = await loads(d, rc.router.weights)
    ident = await identity(d, spec, moved)
    return {"shard_names": shards, "ingest_s": ingest_s, "loads_before": before, "loads_after": after,
            "loads_final": final, "imbalance_before": imbalance(before, shards),
            "imbalance_after": imbalance(after, shards), "rebalance": reb, "moves": moves, "identity": ident,
            "identity_all_equal": all(r["equal"] for r in ident),
            "distinct_answers": len({r["answers"][0] for r in ident}),
            "identity_moved_vs_unmoved": sum(r["kind"] == "moved_vs_unmoved" for r in ident)}
