"""Load of shards and streams, and the two decisions taken from it: placement and rebalancing.

A stream's score weighs its KV bytes, ingest rate and question rate (`LoadWeights`); a shard's
score is the sum of its streams' scores plus its queued frames. Pure functions over
plain data: the router gathers the reports, these decide.

Invariants of `plan_moves`: it moves whole streams only; each move strictly lowers the larger of
the two shards' scores (so rounds never oscillate); it stops when max <= skew_ratio x max(min,
min_score), or after `max_moves`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mosaic_ray.runtime.config import LoadWeights

GIB = float(1 << 30)


@dataclass(slots=True)
class StreamLoad:
    stream_id: str
    kv_bytes: int = 0
    ingest_fps: float = 0.0
    queries_per_s: float = 0.0

    def score(self, w: LoadWeights) -> float:
        return (
            w.stream
            + w.kv_gib * self.kv_bytes / GIB
            + w.ingest_fps * self.ingest_fps
            + w.queries_per_s * self.queries_per_s
        )


@dataclass(slots=True)
class LoadReport:
    """What a shard reports about itself (`ShardActor.load`). Rates and bytes are sums over the
    streams it holds now (rates travel with a migrating stream), so a shard's score is the sum of
    its streams' scores plus its queue: moving a stream moves exactly its score."""

    shard: str
    streams: int = 0
    kv_bytes_device: int = 0
    kv_bytes_host: int = 0
    ingest_fps: float = 0.0
    queries_per_s: float = 0.0
    pending_frames: int = 0
    active_queries: int = 0
    healthy: bool = True

    def score(self, w: LoadWeights) -> float:
        return (
            w.stream * self.streams
            + w.kv_gib * (self.kv_bytes_device + self.kv_bytes_host) / GIB
            + w.ingest_fps * self.ingest_fps
            + w.queries_per_s * self.queries_per_s
            + w.pending_frames * self.pending_frames
        )


@dataclass(slots=True, frozen=True)
class Move:
    stream_id: str
    source: str
    target: str


def by_load(scores: dict[str, float]) -> list[str]:
    """Shards from the lowest score up (ties: by name, so placement is deterministic)."""
    return sorted(sorted(scores), key=lambda s: scores[s])


def least_loaded(scores: dict[str, float]) -> str:
    """The shard with the lowest score (ties: the first by name)."""
    if not scores:
        raise ValueError("no healthy shard to place on")
    return by_load(scores)[0]


def plan_moves(
    scores: dict[str, float],
    streams: dict[str, list[StreamLoad]],
    w: LoadWeights,
    skew_ratio: float,
    min_score: float,
    max_moves: int,
) -> list[Move]:
    """Greedy rebalancing: move from the heaviest to the lightest shard the stream whose score is
    closest to half their gap, while the skew lasts."""
    scores = dict(scores)
    streams = {s: list(v) for s, v in streams.items()}
    moves: list[Move] = []
    while len(scores) >= 2 and len(moves) < max_moves:
        heavy = max(sorted(scores), key=lambda s: scores[s])
        light = least_loaded(scores)
        gap = scores[heavy] - scores[light]
        if scores[heavy] <= skew_ratio * max(scores[light], min_score):
            break
        # A stream as large as the gap would only swap the two shards' scores.
        candidates = [s for s in streams.get(heavy, []) if s.score(w) < gap * (1 - 1e-9)]
        if not candidates:
            break
        pick = min(candidates, key=lambda s: (abs(s.score(w) - gap / 2), s.stream_id))
        streams[heavy].remove(pick)
        streams.setdefault(light, []).append(pick)
        scores[heavy] -= pick.score(w)
        scores[light] += pick.score(w)
        moves.append(Move(pick.stream_id, heavy, light))
    return moves
