"""Where one question's time goes: torch.profiler over one answer per method, on a filled stream.

For each method the stream is filled with `--minutes` of synthetic frames (as in bench_query.py),
two questions warm up, then one question runs under torch.profiler (CPU + CUDA). The summary per
method: TTFT and total of that answer, host time and GPU kernel time, kernel launches, the time in
`mosaic.retrieve_layer` ranges (selection + gather of every layer), and the top ops by host time
and by GPU time. This is the profile the issue asks for where a latency target is missed.

    python scaling_bench/question_profile.py --minutes 10 --methods cluster,token   # GPU, 7b-shape
    python scaling_bench/question_profile.py --quick                               # CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from mosaic_ray.engine.interface import AskRequest  # noqa: E402
from mosaic_ray.model.registry import load_model  # noqa: E402
from scaling_bench.bench_query import QUESTIONS, _frames, make_engine  # noqa: E402
from scaling_bench.harness.synthetic import centers_for, fill  # noqa: E402


def _summary(prof, cuda: bool, top: int) -> dict:
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if "Synchronize" in e.key)
    gpu_us = sum(getattr(e, dev_attr) for e in events if getattr(e, dev_attr) > 0 and e.device_type.name == "CUDA") if cuda else 0
    retrieve = next((e for e in events if e.key == "mosaic.retrieve_layer"), None)
    gather_us = sum(getattr(e, dev_attr) for e in events if e.key.startswith(("_gather_clusters_kernel", "_gather_rows_kernel")))
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    by_gpu = sorted(events, key=lambda e: getattr(e, dev_attr), reverse=True)[:top] if cuda else []
    row = lambda e: {"op": e.key[:80], "calls": e.count, "self_host_ms": e.self_cpu_time_total / 1e3,  # noqa: E731
                     "self_gpu_ms": getattr(e, dev_attr) / 1e3}
    return {"kernel_launches": launches, "syncs": syncs, "gpu_kernel_ms": gpu_us / 1e3, "gather_kernel_ms": gather_us / 1e3,
            "retrieve_host_ms": retrieve.cpu_time_total / 1e3 if retrieve else 0.0,
            "retrieve_calls": retrieve.count if retrieve else 0,
            "top_host": [row(e) for e in by_host], "top_gpu": [row(e) for e in by_gpu]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7b-shape")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--methods", default="cluster,token")
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--pool-gb", type=float, default=40.0)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--trace", action="store_true", help="also write the prefill step's Chrome trace")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.minutes, a.pool_gb, a.window, a.top = "tiny", 0.5, 0.1, 64, 8
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    adapter = load_model(a.model, device)
    tokens = adapter.frame_chunk(adapter.encode_frames(_frames(1))[0], 0.0).size
    results = []
    for method in a.methods.split(","):
        engine = make_engine(adapter, method, a.minutes, 1.0, tokens, a.budget, a.window, a.pool_gb, device)
        engine.open_stream("s")
        fill(engine, "s", int(a.minutes * 60), tokens, centers_for(engine.layout, device))
        for i in range(2):
            engine.answer("s", AskRequest(QUESTIONS[i], max_tokens=16))
        plain = sorted(engine.answer("s", AskRequest(QUESTIONS[3 + i], max_tokens=16)).ttft_s for i in range(3))
        if cuda:
            torch.cuda.synchronize()
        # the prefill step alone (what TTFT is made of), with Python stacks
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), with_stack=True) as pre:
            run = engine._start("s", AskRequest(QUESTIONS[2], max_tokens=16))
            engine._advance([run])
        while run.phase != "done":
            engine._advance([run])
        moved = run.answer().fetched_bytes
        prefill = {k: v for k, v in _summary(pre, cuda, a.top).items() if not k.startswith("top")}
        stacks = pre.key_averages(group_by_stack_n=6).table(sort_by="self_cpu_time_total", row_limit=a.top)
        print(stacks, flush=True)
        tag = method.replace(":", "_")
        (Path(a.out) / f"question_profile_{tag}_prefill_stacks.txt").write_text(stacks)
        if a.trace:
            pre.export_chrome_trace(str(Path(a.out) / f"question_profile_{tag}_prefill_trace.json"))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            ans = engine.answer("s", AskRequest(QUESTIONS[2], max_tokens=16))
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        engine.close_stream("s")
        res = {"method": method, "minutes": a.minutes, "ttft_ms_unprofiled": plain[1] * 1e3,
               "ttft_ms": ans.ttft_s * 1e3, "total_ms": wall * 1e3,
               "bytes_moved": moved, "gather_kernel_ms": prefill["gather_kernel_ms"],
               "copy_gbps_in_kernel": moved / (prefill["gather_kernel_ms"] * 1e6) if prefill["gather_kernel_ms"] else None,
               "prefill": prefill,
               "answer_tokens": len(ans.token_ids), **_summary(prof, cuda, a.top)}
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if not k.startswith("top")}), flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top), flush=True)
        # the next method's engine pins its own host pool: let this one's go first
        del engine, run, ans, prof, pre
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    out = Path(a.out)
    (out / "question_profile.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu",
                                                           "model": a.model, "results": results}, indent=1))
    lines = ["| method | minutes | TTFT ms | TTFT ms (profiled) | answer ms | GPU kernel ms | launches | syncs | "
             "retrieve host ms | prefill: launches | syncs | retrieve host ms | MB moved | gather kernel ms | GB/s in kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["prefill"]
        lines.append(f"| {r['method']} | {r['minutes']} | {r['ttft_ms_unprofiled']:.1f} | {r['ttft_ms']:.1f} | {r['total_ms']:.1f} | "
                     f"{r['gpu_kernel_ms']:.1f} | {r['kernel_launches']} | {r['syncs']} | {r['retrieve_host_ms']:.1f} | "
                     f"{f['kernel_launches']} | {f['syncs']} | {f['retrieve_host_ms']:.1f} | {r['bytes_moved'] / 1e6:.0f} | "
                     f"{r['gather_kernel_ms']:.2f} | {r['copy_gbps_in_kernel'] or 0:.1f} |")
    for r in results:
        lines += ["", f"{r['method']}: top ops by host time", "", "| op | calls | self host ms | self GPU ms |", "|---|---|---|---|"]
        lines += [f"| {t['op']} | {t['calls']} | {t['self_host_ms']:.2f} | {t['self_gpu_ms']:.2f} |" for t in r["top_host"]]
        if r["top_gpu"]:
            lines += ["", f"{r['method']}: top ops by GPU time", "", "| op | calls | self host ms | self GPU ms |", "|---|---|---|---|"]
            lines += [f"| {t['op']} | {t['calls']} | {t['self_host_ms']:.2f} | {t['self_gpu_ms']:.2f} |" for t in r["top_gpu"]]
    (out / "question_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 2 + len(results)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
