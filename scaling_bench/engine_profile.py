"""Where one shard's GPU time goes, with the engine in-process (no Ray, no HTTP): ingest of B streams
x 1 frame in one `append_frames_batch` call (and the vision tower alone), then 1 and N questions
answered together. The ceiling under `streams_per_gpu.py` and `query_latency.py`.

    python scaling_bench/engine_profile.py --frames-file scratch/frames_336.npz        # GPU, 7b-shape
    python scaling_bench/engine_profile.py --quick --out /tmp/r                        # CPU, seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from mosaic_ray.bench import cli, report
from mosaic_ray.bench.engines import engine_kwargs
from mosaic_ray.bench.video_frames import real_frames
from mosaic_ray.engine.interface import AskRequest
from mosaic_ray.engine.stream_engine import StreamEngine

NAME = "engine_profile"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--method", default="cluster")
    p.add_argument("--batches", default="1,4,16,32", help="streams appending one frame each, per call")
    p.add_argument("--calls", type=int, default=6, help="timed calls per batch size (after 3 warm-up calls)")
    p.add_argument("--questions", type=int, default=8, help="questions answered together in the second timing")
    a = p.parse_args(argv)
    cli.resolve(a)
    if a.quick:
        a.batches, a.calls, a.questions = "1,4", 2, 2
    frames, source = real_frames(a.size, frames_file=a.frames_file)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
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
        sync()
        t = time.perf_counter()
        for _ in range(a.calls):
            append(sids)
        sync()
        call_s = (time.perf_counter() - t) / a.calls
        t = time.perf_counter()
        engine.adapter.encode_frames([frames[0]] * B)
        sync()
        vision_s = time.perf_counter() - t
        rows.append({"streams": B, "ms_per_call": call_s * 1e3, "frames_per_s": B / call_s, "vision_ms": vision_s * 1e3})
        print(f"  ingest B={B:3d}: {call_s * 1e3:7.1f} ms/call = {B / call_s:6.1f} frames/s (vision alone "
              f"{vision_s * 1e3:6.1f} ms)", flush=True)
    questions = []
    asked = [s for s in clock][: a.questions]
    for n in sorted({1, min(a.questions, len(asked))}):
        items = [(s, AskRequest("What is happening now?", max_tokens=a.max_tokens)) for s in asked[:n]]
        engine.answer_batch(items)  # warm-up (new shapes)
        sync()
        t = time.perf_counter()
        answers = engine.answer_batch(items)
        sync()
        wall = time.perf_counter() - t
        ttft = sorted(x.ttft_s for x in answers)[len(answers) // 2]
        questions.append({"questions": n, "wall_ms": wall * 1e3, "ttft_p50_ms": ttft * 1e3,
                          "tokens": sum(len(x.token_ids) for x in answers)})
        print(f"  {n} question(s) together: {wall * 1e3:.0f} ms, TTFT p50 {ttft * 1e3:.0f} ms", flush=True)
    mach = report.machine()
    result = {"bench": NAME, "machine": mach, "model": a.model, "engine_device": a.device, "method": a.method,
              "video": source, "frame_px": a.size, "engine_build_s": built_s, "ingest": rows, "questions": questions}
    table = [f"Machine: {mach['device']}; model {a.model} on {a.device}; {a.method} retrieval; {a.size}px frames of "
             f"{source}; engine in-process", "", "| streams x 1 frame per call | ms per call | frames/s | vision alone ms |",
             "|---|---|---|---|"]
    table += [f"| {r['streams']} | {r['ms_per_call']:.1f} | {r['frames_per_s']:.1f} | {r['vision_ms']:.1f} |" for r in rows]
    table += ["", f"| questions together ({a.max_tokens} tokens each) | wall ms | TTFT p50 ms |", "|---|---|---|"]
    table += [f"| {q['questions']} | {q['wall_ms']:.0f} | {q['ttft_p50_ms']:.0f} |" for q in questions]
    out = report.write(a.out, NAME, result, table)
    print("\n".join(table))
    print(f"wrote {out}/{NAME}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
