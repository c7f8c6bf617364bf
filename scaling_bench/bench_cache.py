"""Cache-level GPU benchmark at Qwen2-VL-7B shapes (28 layers x 4 KV heads x 128, bf16).

1. Assignment throughput: ClusterIndex.insert of frames of 196 tokens (all 28 layers and 4 heads
   in one call), `--insert-batches` frames per call side by side (1: each frame as it leaves the
   window; 7: one offload of staged tokens), after `--warm` frames; token-layer assignments/s
   (the issue's target: >= 351k/s = 64 streams x 196 tokens x 28 layers at 1 frame/s).
2. Per-question retrieval over all 28 layers for full | frame | token | cluster side by side on
   the same synthetic stream (keys drawn around slowly drifting centres, like consecutive similar
   frames): time (select + gather to the device), tokens, copy runs, bytes, device bytes.

Keys are synthetic here (speed depends on shapes, not weights); retrieval *quality* is measured
on real features by scaling_bench/fidelity.py.

    python scaling_bench/bench_cache.py --frames 600 --out docs/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from mosaic_ray.cache.cluster_index import ClusterIndex  # noqa: E402
from mosaic_ray.cache.host_pool import HostPool  # noqa: E402
from mosaic_ray.cache.splitter import drain_splits  # noqa: E402
from mosaic_ray.cache.stream_cache import StreamCache  # noqa: E402
from mosaic_ray.cache.token_batch import TokenBatch  # noqa: E402
from mosaic_ray.config import CacheConfig, ClusterConfig, KVLayout, PoolConfig  # noqa: E402
from scaling_bench.harness.synthetic import frame_batch  # noqa: E402
from scaling_bench.harness.timing import sync  # noqa: E402

LAYERS, HEADS, DIM = 28, 4, 128


def _frames(layout, first: int, count: int, tokens: int, device, centers) -> TokenBatch:
    """`count` consecutive frames as one batch (what one offload of staged tokens inserts)."""
    parts = [frame_batch(layout, f, tokens, device, centers) for f in range(first, first + count)]
    if count == 1:
        return parts[0]
    return TokenBatch(*(torch.cat([getattr(p, n) for p in parts], dim) for n, dim in
                        (("keys", 1), ("values", 1), ("order", 0), ("time", 0), ("pos", 0), ("block", 0))))


def bench_assign(layout, device, frames, tokens, warm, pool_gb, batch: int = 1, split_batch: int | None = None) -> dict:
    """Insert `frames` frames, `batch` frames per insert call (1: as each frame leaves the window;
    7: one offload of CacheConfig.offload_batch = 1024 staged tokens of 146-token frames); after
    each insert, drain the flagged splits until none is left, `split_batch` per drain."""
    pool = HostPool(layout, PoolConfig(capacity_bytes=int(pool_gb * 2**30)))
    config = ClusterConfig() if split_batch is None else ClusterConfig(split_batch=split_batch)
    index = ClusterIndex(layout, config, pool, pool.register_owner(), device)
    splits = drains = 0
    centers = torch.randn(layout.groups, 32, layout.head_dim, device=device) * 2
    times, split_times = [], []
    for f in range(0, frames - batch + 1, batch):
        b = _frames(layout, f, batch, tokens, device, centers)
        sync(device)
        t0 = time.perf_counter()
        index.insert(b)
        sync(device)
        t1 = time.perf_counter()
        while True:
            done = drain_splits(index)
            if f >= warm:
                splits, drains = splits + done, drains + 1
            if done < config.split_batch:
                break
        sync(device)
        t2 = time.perf_counter()
        if f >= warm:
            times.append((t1 - t0) / batch)
            split_times.append((t2 - t1) / batch)
    per_frame = sum(times) / len(times)
    with_splits = (sum(times) + sum(split_times)) / len(times)
    return {
        "frames": frames, "tokens_per_frame": tokens, "frames_per_insert": batch, "clusters_per_group": index.total_clusters / layout.groups,
        "split_batch": config.split_batch, "splits_per_frame": splits / max(1, len(times) * batch),
        "drains_per_insert": drains / max(1, len(times)),
        "insert_ms_per_frame": per_frame * 1e3, "split_ms_per_frame": sum(split_times) / len(times) * 1e3,
        "token_layer_assignments_per_s": tokens * layout.num_layers / per_frame,
        "token_layer_assignments_per_s_with_splits": tokens * layout.num_layers / with_splits,
        "streams_at_1fps_per_gpu": 1.0 / with_splits,
        "metadata_bytes": index.metadata_bytes(),
    }


def bench_query(layout, device, frames, tokens, budget_ratio, questions, pool_gb, window=2048) -> dict:
    centers = torch.randn(layout.groups, 32, layout.head_dim, device=device) * 2
    pool = HostPool(layout, PoolConfig(capacity_bytes=int(pool_gb * 2**30)))
    results = {}
    for method in ("full", "frame", "token", "cluster"):
        cfg = CacheConfig(retrieval=method, budget_ratio=budget_ratio, window_tokens=window, sink_tokens=16)
        cache = StreamCache(layout, cfg, pool, device)
        t0 = time.perf_counter()
        for f in range(frames):
            cache.append(frame_batch(layout, f, tokens, device, centers))
            cache.maintain()
        cache.offload()  # the questions below retrieve from the whole past
        sync(device)
        ingest = time.perf_counter() - t0
        lat, copies, moved, fetched = [], 0, 0, 0
        for q in range(questions + 1):
            query = torch.randn(LAYERS, HEADS, DIM, device=device, generator=torch.Generator(device=device).manual_seed(q))
            sync(device)
            t0 = time.perf_counter()
            for layer in range(LAYERS):
                r = cache.retrieve(layer, (query[layer] + centers[layer * HEADS:(layer + 1) * HEADS, q % 32]).to(torch.float32))
                if q:
                    copies += r.copies
                    moved += r.bytes_moved
                    fetched += r.tokens
            sync(device)
            if q:  # first question warms up
                lat.append(time.perf_counter() - t0)
        lat.sort()
        results[method] = {
            "past_tokens": cache.past_tokens, "budget_tokens_per_head": cache.budget(),
            "retrieval_ms_p50": lat[len(lat) // 2] * 1e3, "retrieval_ms_max": lat[-1] * 1e3,
            "copies_per_question": copies / questions, "bytes_per_question": moved / questions,
            "tokens_per_question": fetched / questions,
            "achieved_gbps": moved / questions / (lat[len(lat) // 2]) / 1e9 if moved else 0.0,
            "device_bytes": cache.device_bytes(), "host_bytes": cache.host_bytes(), "ingest_s": ingest,
        }
        cache.release()
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--tokens", type=int, default=196)
    p.add_argument("--warm", type=int, default=50)
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--pool-gb", type=float, default=8.0)
    p.add_argument("--skip-query", action="store_true")
    p.add_argument("--insert-batches", default="1,7",
                   help="frames per insert call, side by side (7 x 146 tokens ~ one offload of 1024 staged tokens)")
    p.add_argument("--split-batches", default=None,
                   help="ClusterConfig.split_batch values side by side, at the first --insert-batches value")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU, seconds")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers, heads, dim, dtype = (LAYERS, HEADS, DIM, torch.bfloat16) if not a.quick else (2, 2, 32, torch.float32)
    if a.quick:
        a.frames, a.tokens, a.warm, a.questions, a.pool_gb = 40, 32, 4, 2, 0.05
    layout = KVLayout(layers, heads, dim, dtype)
    globals().update(LAYERS=layers, HEADS=heads, DIM=dim)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = {"device": name, "layout": [layers, heads, dim, str(dtype)]}
    out["assign_by_batch"] = {}
    for batch in [int(x) for x in a.insert_batches.split(",")]:
        out["assign_by_batch"][batch] = r = bench_assign(layout, device, a.frames, a.tokens, a.warm, a.pool_gb, batch)
        print(f"{batch} frame(s) per insert: insert {r['insert_ms_per_frame']:.2f} ms/frame, "
              f"splits {r['split_ms_per_frame']:.2f} ms/frame, clusters/group {r['clusters_per_group']:.0f}", flush=True)
    out["assign"] = out["assign_by_batch"][int(a.insert_batches.split(",")[0])]
    if a.split_batches:
        out["assign_by_split_batch"] = {}
        for sb in [int(x) for x in a.split_batches.split(",")]:
            r = bench_assign(layout, device, a.frames, a.tokens, a.warm, a.pool_gb, int(a.insert_batches.split(",")[0]), sb)
            out["assign_by_split_batch"][sb] = r
            print(f"split_batch {sb}: splits {r['split_ms_per_frame']:.2f} ms/frame ({r['splits_per_frame']:.1f} splits "
                  f"per frame, {r['drains_per_insert']:.1f} drains per insert)", flush=True)
    if not a.skip_query:
        out["query"] = bench_query(layout, device, a.frames, a.tokens, a.budget, a.questions, a.pool_gb,
                                   window=64 if a.quick else 2048)
        print(f"{'method':8} {'past':>8} {'ms p50':>8} {'copies':>9} {'MB':>8} {'GB/s':>6} {'dev MB':>8}")
        for m, r in out["query"].items():
            print(f"{m:8} {r['past_tokens']:8d} {r['retrieval_ms_p50']:8.1f} {r['copies_per_question']:9.0f} "
                  f"{r['bytes_per_question'] / 1e6:8.1f} {r['achieved_gbps']:6.1f} {r['device_bytes'] / 2**20:8.1f}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, "bench_cache.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
