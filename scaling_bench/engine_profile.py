"""Where one shard's GPU time goes, with the engine in-process (no Ray, no HTTP): ingest of B streams
x 1 frame in one `append_frames_batch` call (and the vision tower alone), then 1 and N questions
answered together, then decode ms per step with 1, 8, 32, 64 questions together, each stream holding
`--decode-kv` tokens (`full`: all of them attended at every step), beside plain transformers at the
same batch and KV length (`plain-hf`, a DynamicCache, eager). The ceiling under `streams_per_gpu.py`
and `query_latency.py`.

    python scaling_bench/engine_profile.py --frames-file scratch/frames_336.npz        # GPU, 7b-shape
    python scaling_bench/engine_profile.py --quick --out /tmp/r                        # CPU, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from mosaic_ray.engine.interface import AskRequest  # noqa: E402
from mosaic_ray.engine.stream_engine import StreamEngine  # noqa: E402
from scaling_bench.harness import cli, report  # noqa: E402
from scaling_bench.harness.engines import engine_kwargs  # noqa: E402
from scaling_bench.harness.timing import timed  # noqa: E402
from scaling_bench.harness.video_frames import real_frames  # noqa: E402

NAME = "engine_profile"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--method", default="cluster")
    p.add_argument("--batches", default="1,4,16,32", help="streams appending one frame each, per call")
    p.add_argument("--calls", type=int, default=6, help="timed calls per batch size (after 3 warm-up calls)")
    p.add_argument("--questions", type=int, default=8, help="questions answered together in the second timing")
    p.add_argument("--decode-batches", default="1,8,32,64", help="questions decoding together (empty: skip)")
    p.add_argument("--decode-kv", type=int, default=8192, help="tokens each decoding stream attends")
    p.add_argument("--decode-tokens", type=int, default=24, help="answer tokens per question in the decode timing")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-transformers decode anchor")
    a = p.parse_args(argv)
    cli.resolve(a)
    if a.quick:
        a.batches, a.calls, a.questions = "1,4", 2, 2
        a.decode_batches, a.decode_kv, a.decode_tokens = "1,4", 256, 6
    frames, source = real_frames(a.size, frames_file=a.frames_file)
    t0 = time.perf_counter()
    engine = StreamEngine.from_spec(**engine_kwargs(a.method, a.model, a.device, a.window, a.pool_mb))
    built_s = time.perf_counter() - t0
    clock: dict[str, int] = {}

    def append(sids):
        items = []
        for s in sids:
            clock[s] = clock.get(s, -1) + 1
            items.append((s, [frames[clock[s] % len(frames)]], [float(clock[s])]))
        engine.append_frames_batch(items)

    rows = []
    for B in (int(x) for x in a.batches.split(",")):
        sids = [f"b{B}-{i}" for i in range(B)]
        for s in sids:
            engine.open_stream(s)
        for _ in range(3):
            append(sids)
        call_s = timed(lambda: [append(sids) for _ in range(a.calls)], a.device)[0] / a.calls
        vision_s = timed(lambda: engine.adapter.encode_frames([frames[0]] * B), a.device)[0]
        rows.append({"streams": B, "ms_per_call": call_s * 1e3, "frames_per_s": B / call_s, "vision_ms": vision_s * 1e3})
        print(f"  ingest B={B:3d}: {call_s * 1e3:7.1f} ms/call = {B / call_s:6.1f} frames/s (vision alone "
              f"{vision_s * 1e3:6.1f} ms)", flush=True)
    questions = []
    asked = [s for s in clock][: a.questions]
    for n in sorted({1, min(a.questions, len(asked))}):
        items = [(s, AskRequest("What is happening now?", max_tokens=a.max_tokens)) for s in asked[:n]]
        engine.answer_batch(items)  # warm-up (new shapes)
        wall, answers = timed(lambda: engine.answer_batch(items), a.device)
        ttft = sorted(x.ttft_s for x in answers)[len(answers) // 2]
        questions.append({"questions": n, "wall_ms": wall * 1e3, "ttft_p50_ms": ttft * 1e3,
                          "tokens": sum(len(x.token_ids) for x in answers)})
        print(f"  {n} question(s) together: {wall * 1e3:.0f} ms, TTFT p50 {ttft * 1e3:.0f} ms", flush=True)
    decode = decode_profile(a, engine) if a.decode_batches else []
    mach = report.machine()
    result = {"bench": NAME, "machine": mach, "model": a.model, "engine_device": a.device, "method": a.method,
              "video": source, "frame_px": a.size, "engine_build_s": built_s, "ingest": rows, "questions": questions,
              "decode_kv_tokens": a.decode_kv, "decode": decode}
    table = [f"Machine: {mach['device']}; model {a.model} on {a.device}; {a.method} retrieval; {a.size}px frames of "
             f"{source}; engine in-process", "", "| streams x 1 frame per call | ms per call | frames/s | vision alone ms |",
             "|---|---|---|---|"]
    table += [f"| {r['streams']} | {r['ms_per_call']:.1f} | {r['frames_per_s']:.1f} | {r['vision_ms']:.1f} |" for r in rows]
    table += ["", f"| questions together ({a.max_tokens} tokens each) | wall ms | TTFT p50 ms |", "|---|---|---|"]
    table += [f"| {q['questions']} | {q['wall_ms']:.0f} | {q['ttft_p50_ms']:.0f} |" for q in questions]
    if decode:
        nan = float("nan")
        table += ["", f"| questions decoding together (each over {a.decode_kv} tokens) | mosaic_ray ms/step | "
                      "plain transformers ms/step (default SDPA) | plain, no cuDNN attention | speed-up vs the faster plain |",
                  "|---|---|---|---|---|"]
        for d in decode:
            plain = min(d.get("plain_ms_per_step") or nan, d.get("plain_no_cudnn_ms_per_step") or nan)
            table.append(f"| {d['questions']} | {d['ms_per_step']:.1f} | {d.get('plain_ms_per_step') or nan:.1f} | "
                         f"{d.get('plain_no_cudnn_ms_per_step') or nan:.1f} | {plain / d['ms_per_step']:.2f} |")
    out = report.write(a.out, NAME, result, table)
    if decode:
        plot_decode(result, out / f"{NAME}.png")
    print("\n".join(table))
    print(f"wrote {out}/{NAME}.{{json,md}}")
    return 0


def decode_profile(a, engine) -> list[dict]:
    """ms per decode step with B questions together, each stream holding `decode_kv` tokens in the
    device pool (a `full` engine of the same model), beside plain transformers at the same B."""
    from mosaic_ray.config import EngineConfig
    from scaling_bench.harness import plain_hf
    from scaling_bench.harness.synthetic import centers_for, fill

    for sid in list(engine.streams):  # the ingest engine gives its device pool back first
        engine.close_stream(sid)
    adapter = engine.adapter
    engine.kv_pool = engine.runner = None
    gc_collect(a.device)
    cfg = EngineConfig(model=a.model, device=a.device, cache={"retrieval": "full", "window_tokens": a.window,
                                                                "sink_tokens": 16, "pool": {"capacity_bytes": 64 << 20}})
    full = StreamEngine(cfg, adapter=adapter)
    centers = centers_for(full.layout, full.device)
    rows, chunk = [], 1024
    for B in (int(x) for x in a.decode_batches.split(",")):
        sids = [f"d{B}-{i}" for i in range(B)]
        tokens = min(chunk, a.decode_kv)  # each stream holds decode_kv tokens, rounded down to whole chunks
        for s in sids:
            full.open_stream(s)
            fill(full, s, a.decode_kv // tokens, tokens, centers)
        short, long_ = 4, 4 + a.decode_tokens

        def answers_of(n, engine=full):
            return timed(lambda: engine.answer_batch([(s, AskRequest("Describe what happens.", max_tokens=n))
                                                      for s in sids]), a.device)

        answers_of(long_)  # warm-up (graph capture of this bucket, kernels)
        # two answers that differ only in their number of decode steps: the difference is decode
        # alone (prefill, closing and commit cancel)
        (t_short, _), (t_long, answers) = answers_of(short), answers_of(long_)
        steps = min(len(x.token_ids) for x in answers) - short
        row = {"questions": B, "ms_per_step": (t_long - t_short) / max(1, steps) * 1e3, "decode_steps": steps,
               "ttft_p50_ms": sorted(x.ttft_s for x in answers)[B // 2] * 1e3}
        for s in sids:
            full.close_stream(s)
        row["graph_steps"], row["eager_decode_steps"] = full.runner.counters["graph_steps"], full.runner.counters["eager_decode_steps"]
        rows.append(row)
        print(f"  decode B={B:3d}: {row['ms_per_step']:6.1f} ms/step", flush=True)
    # the anchor runs alone on the card: our engine's device pool is given back first
    del full
    gc_collect(a.device)
    for row in rows if not a.no_plain else []:
        for key, cudnn in (("plain_ms_per_step", True), ("plain_no_cudnn_ms_per_step", False)):
            try:
                row[key] = plain_hf.decode_step(adapter, row["questions"], a.decode_kv, cudnn=cudnn)
            except torch.OutOfMemoryError as err:
                row[key.replace("ms_per_step", "error")] = str(err)[:100]
            gc_collect(a.device)
        gc_collect(a.device)
        print(f"  plain transformers decode B={row['questions']:3d}: {row.get('plain_ms_per_step', float('nan')):6.1f} ms/step"
              f" ({row.get('plain_no_cudnn_ms_per_step', float('nan')):6.1f} without cuDNN attention)", flush=True)
    return rows


def plot_decode(result: dict, path) -> None:
    """Decode ms per step against questions decoding together: ours beside plain transformers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["decode"]
    bs = [r["questions"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bs, [r["ms_per_step"] for r in rows], "o-", label="mosaic_ray (CUDA-graph decode)")
    for key, label in (("plain_ms_per_step", "plain transformers, default SDPA"),
                       ("plain_no_cudnn_ms_per_step", "plain transformers, SDPA without cuDNN")):
        if any(key in r for r in rows):
            ax.plot(bs, [r.get(key, float("nan")) for r in rows], "s--", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("questions decoding together")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"{result['model']} on {result['machine']['device']}, {result['decode_kv_tokens']} KV tokens each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def gc_collect(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
