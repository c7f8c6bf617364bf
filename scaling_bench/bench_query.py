"""Question latency of full | frame | token | cluster side by side, in one run, on one model.

For each stream length the same synthetic past (keys around slowly drifting centres; speed
depends on shapes, not weights) is put into each method's cache, then real questions run through
the real decoder with retrieval attention: TTFT p50/p99, decode tokens/s, fetch time and achieved
host-to-device GB/s (vs the 53.5 GB/s pinned peak of an H100), device bytes per stream-hour, peak
VRAM. Ingest latency per real frame (vision + chunk prefill + offload) is measured per method too.

    python scaling_bench/bench_query.py --model 7b-shape --minutes 10,30 --out docs/results   # GPU
    python scaling_bench/bench_query.py --quick                                               # CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from mosaic_ray.config import CacheConfig, ClusterConfig, EngineConfig  # noqa: E402
from mosaic_ray.engine.interface import AskRequest  # noqa: E402
from mosaic_ray.engine.stream_engine import StreamEngine  # noqa: E402
from mosaic_ray.model.registry import load_model  # noqa: E402
from scaling_bench.harness.synthetic import centers_for, fill  # noqa: E402
from scaling_bench.harness.timing import sync, timed  # noqa: E402

METHODS = ("plain-hf", "plain-hf:no-cudnn", "full", "frame", "token", "cluster", "token:prefetch", "cluster:prefetch")
PINNED_PEAK_GBPS = 53.5
QUESTIONS = ["What is the person in the red jacket doing?", "When did the car leave?", "How many birds are there?",
             "What color is the door?", "Summarize the last scene.", "Who entered the room first?",
             "Where is the dog?", "What changed on the table?"]


def _frames(n: int):
    """Real frames when PyAV is installed (the GPU machine may lack it); else random RGB frames of
    the same size: ingest cost depends on the frame's shape, not its pixels."""
    import numpy as np

    try:
        from mosaic_ray.video import default_video, read_frames

        return [f.rgb for f in read_frames(default_video(), fps=4, max_frames=n, size=336)]
    except ImportError:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 255, (336, 336, 3), dtype=np.uint8) for _ in range(n)]


def ingest_latency(engine: StreamEngine, frames) -> float:
    engine.open_stream("ingest")
    times = []
    for i, f in enumerate(frames):
        times.append(timed(lambda: engine.append_frames("ingest", [f], [float(i)]), engine.device)[0])
    engine.close_stream("ingest")
    times = sorted(times[2:])
    return times[len(times) // 2]


def make_engine(adapter, variant, minutes, fps, tokens, budget, window, pool_gb, device,
                time_fetch: bool = False) -> StreamEngine:
    """The engine of one row: `variant` is a method name with flags, e.g. "cluster:prefetch", or
    "cluster:vr=0.15:slab=16" (the cluster knobs of an older default), "token:scoring=mean" (how a
    question scores the past, `CacheConfig.scoring`), "cluster:coact=0.5:probe=4" (`ClusterConfig.coactivation`,
    `coactivation_probe`). `time_fetch`: `EngineConfig.time_fetch` (a sync after each layer's fetch)."""
    method, *flags = variant.split(":")
    knobs = dict(f.split("=", 1) for f in flags if "=" in f)
    unknown = set(knobs) - {"vr", "slab", "scoring", "coact", "probe"} | {f for f in flags if "=" not in f} - {"prefetch"}
    if unknown:
        raise ValueError(f"variant {variant!r}: unknown flags {sorted(unknown)} (prefetch, vr=, slab=, scoring=, coact=, probe=)")
    # the pool is sized to the stream (slab tails waste a little), capped by --pool-gb; `full` keeps
    # everything on the device and needs only a token pool
    need = int(minutes * 60 * fps + 64) * tokens * adapter.layout.bytes_per_token * 1.4
    capacity = min(int(pool_gb * 2**30), int(need)) if method != "full" else 64 << 20
    cfg = EngineConfig(model="bench", device=str(device), prefetch="prefetch" in flags, time_fetch=time_fetch, cache=CacheConfig(
        retrieval=method, budget_ratio=budget, window_tokens=window, sink_tokens=16,
        scoring=knobs.get("scoring", CacheConfig().scoring),
        pool={"capacity_bytes": max(capacity, 64 << 20), "slab_tokens": int(knobs["slab"]) if "slab" in knobs else None},
        cluster={"variance_ratio": float(knobs.get("vr", ClusterConfig().variance_ratio)),
                 "coactivation": float(knobs.get("coact", ClusterConfig().coactivation)),
                 "coactivation_probe": float(knobs.get("probe", ClusterConfig().coactivation_probe))}))
    return StreamEngine(cfg, adapter=adapter)


def run_method(adapter, variant, minutes, fps, tokens, budget, window, questions, pool_gb, device, real_frames,
               time_fetch: bool = False):
    engine = make_engine(adapter, variant, minutes, fps, tokens, budget, window, pool_gb, device, time_fetch)
    row = {"method": variant, "minutes": minutes}
    try:
        if real_frames is not None:
            row["ingest_ms_per_frame"] = ingest_latency(engine, real_frames) * 1e3
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        engine.open_stream("s")
        frames = int(minutes * 60 * fps)
        t0 = time.perf_counter()
        fill(engine, "s", frames, tokens, centers_for(engine.layout, device))
        sync(device)
        row["fill_s"] = time.perf_counter() - t0
        answers, upkeep = [], []
        for i in range(questions + 1):  # each question, then the upkeep it leaves (co-activation's probe and regroup)
            answers.append(engine.answer("s", AskRequest(QUESTIONS[i % len(QUESTIONS)], max_tokens=16)))
            sync(device)
            t0 = time.perf_counter()
            engine.streams["s"].cache.maintain(None, offload=False)
            sync(device)
            upkeep.append(time.perf_counter() - t0)
        answers, upkeep = answers[1:], sorted(upkeep[1:])
        ttft = sorted(a.ttft_s for a in answers)
        info = engine.stream_info("s")
        decode = [(len(a.token_ids) - 1) / max(1e-9, a.total_s - a.ttft_s) for a in answers if len(a.token_ids) > 1]
        fetch_s = sum(a.fetch_s for a in answers) / len(answers)
        moved = sum(a.fetched_bytes for a in answers) / len(answers)
        row.update(
            past_tokens=info["past_tokens"], ttft_ms_p50=ttft[len(ttft) // 2] * 1e3,
            ttft_ms_p99=ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] * 1e3,
            decode_tok_s=sum(decode) / max(1, len(decode)), fetch_ms=fetch_s * 1e3,
            upkeep_ms_p50=upkeep[len(upkeep) // 2] * 1e3,
            bytes_per_question=moved, copies_per_question=sum(a.copies for a in answers) / len(answers),
            achieved_gbps=moved / fetch_s / 1e9 if fetch_s and moved else 0.0,
            device_bytes=info["kv_bytes_device"], host_bytes=info["kv_bytes_host"],
            device_bytes_per_stream_hour=info["kv_bytes_device"] / (minutes / 60),
            prefetch_hit_rate=(sum(a.prefetch_hit_rate for a in answers if a.prefetch_hit_rate is not None)
                               / max(1, sum(a.prefetch_hit_rate is not None for a in answers))),
            peak_vram_bytes=(torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else None,
        )
        row["achieved_share_of_peak"] = row["achieved_gbps"] / PINNED_PEAK_GBPS
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err)[:120]}"
    finally:
        for sid in list(engine.streams):
            engine.close_stream(sid)
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_plain(adapter, minutes, fps, tokens, questions, device, variant: str = "plain-hf") -> dict:
    """The anchor row: plain transformers with the whole stream in a DynamicCache, same questions
    (`plain-hf:no-cudnn`: torch's SDPA may not choose cuDNN, see plain_hf.NO_CUDNN)."""
    from scaling_bench.harness import plain_hf

    past = int(minutes * 60 * fps) * tokens
    row = {"method": variant, "minutes": minutes, "past_tokens": past}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        runs = []
        for i in range(questions + 1):
            prompt, _ = adapter.question_text(QUESTIONS[i % len(QUESTIONS)])
            runs.append(plain_hf.question(adapter, past, adapter.tokenizer.encode(prompt, add_special_tokens=False), 16,
                                          cudnn=variant != "plain-hf:no-cudnn"))
        runs = runs[1:]
        ttft = sorted(r["ttft_ms"] for r in runs)
        row.update(ttft_ms_p50=ttft[len(ttft) // 2], ttft_ms_p99=ttft[-1],
                   decode_tok_s=sum(r["decode_tok_s"] for r in runs) / len(runs), fetch_ms=0.0, bytes_per_question=0,
                   copies_per_question=0, achieved_gbps=0.0, achieved_share_of_peak=0.0, prefetch_hit_rate=0.0,
                   device_bytes=past * adapter.layout.bytes_per_token, host_bytes=0,
                   device_bytes_per_stream_hour=past * adapter.layout.bytes_per_token / (minutes / 60),
                   peak_vram_bytes=(torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else None)
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err)[:120]}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lengths = sorted({r["minutes"] for r in rows})
    shown = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(shown)
    for j, m in enumerate(shown):
        ttft = [next((r.get("ttft_ms_p50", 0) for r in rows if r["method"] == m and r["minutes"] == L), 0) for L in lengths]
        mem = [next((r.get("device_bytes", 0) / 2**30 for r in rows if r["method"] == m and r["minutes"] == L), 0) for L in lengths]
        xs = [i + j * width for i in range(len(lengths))]
        axes[0].bar(xs, ttft, width, label=m)
        axes[1].bar(xs, mem, width, label=m)
    for ax, title in zip(axes, ("TTFT p50 (ms)", "device KV bytes of the stream (GiB)")):
        ax.set_xticks([i + 0.3 for i in range(len(lengths))], [f"{L} min" for L in lengths])
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7b-shape")
    p.add_argument("--minutes", default="10,30")
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--pool-gb", type=float, default=40.0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="docs/results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--time-fetch", action="store_true", help="sync after each layer's fetch (exact fetch time, no overlap)")
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.minutes, a.questions, a.pool_gb, a.window = "tiny", "0.5", 2, 0.1, 64
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter = load_model(a.model, device)
    real = _frames(10)
    tokens = adapter.frame_chunk(adapter.encode_frames(real[:1])[0], 0.0).size
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "bench_query.partial.json"
    for minutes in [float(m) for m in a.minutes.split(",")]:
        for method in a.methods.split(","):
            if method.startswith("plain-hf"):
                rows.append(run_plain(adapter, minutes, a.fps, tokens, a.questions, device, method))
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
                partial.write_text(json.dumps(rows, indent=1))
                continue
            row = run_method(adapter, method, minutes, a.fps, tokens, a.budget, a.window, a.questions, a.pool_gb,
                             device, real if minutes == float(a.minutes.split(",")[0]) else None,
                             # a device sync per layer serializes the prefetch stream with compute: off unless asked
                             time_fetch=a.time_fetch)
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            partial.write_text(json.dumps(rows, indent=1))
    partial.unlink()
    result = {"device": card, "model": a.model, "tokens_per_frame": tokens, "fps": a.fps, "budget_ratio": a.budget,
              "window_tokens": a.window, "rows": rows}
    (out / "bench_query.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "bench_query.png")
    head = ("| minutes | method | TTFT p50 ms | TTFT p99 ms | decode tok/s | fetch ms (host-side unless --time-fetch) | upkeep ms after a question "
            "| GB/s (share of 53.5) | copies | prefetch hit rate | device MiB | per stream-hour GiB | host pool MiB |")
    lines = [f"Card: {card}; model {a.model}; {tokens} tokens/frame at {a.fps} fps; budget {a.budget:.0%}", "", head,
             "|" + "---|" * 13]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['minutes']} | {r['method']} | {r['error']} |")
            continue
        lines.append(f"| {r['minutes']} | {r['method']} | {r['ttft_ms_p50']:.1f} | {r['ttft_ms_p99']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {r['fetch_ms']:.1f} | {r.get('upkeep_ms_p50', 0):.1f} | {r['achieved_gbps']:.1f} ({r['achieved_share_of_peak']:.2f}) | "
                     f"{r['copies_per_question']:.0f} | {r['prefetch_hit_rate']:.2f} | {r['device_bytes'] / 2**20:.0f} | {r['device_bytes_per_stream_hour'] / 2**30:.2f} | "
                     f"{r.get('host_bytes', 0) / 2**20:.0f} |")
    (out / "bench_query.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
