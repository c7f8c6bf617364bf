"""How full the cluster method's host-pool slabs are: one stream of real frames ingested with each
(variance_ratio, slab_tokens) pair, then the cluster sizes, the slab fill (tokens stored / rows
held) and the host bytes per past token, against the dense K/V the same tokens need.

A cluster owns whole slabs, so small clusters leave most of each slab empty: this is the table
behind the 4-token default (docs/benchmarks.md section 8). Real weights matter here; random-init
keys form singleton clusters at any threshold.

    python scaling_bench/cluster_storage.py --model dino-smollm2 --frames 48       # CPU, ~2 min
    python scaling_bench/cluster_storage.py --quick --out /tmp/r                    # CPU, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from mosaic_ray.engine.stream_engine import StreamEngine  # noqa: E402
from scaling_bench.harness import cli, report  # noqa: E402
from scaling_bench.harness.video_frames import real_frames  # noqa: E402

NAME = "cluster_storage"


def measure(a: argparse.Namespace, frames: list, ratio: float, slab: int) -> dict:
    engine = StreamEngine.from_spec(model=a.model, device=a.device, cache={
        "retrieval": "cluster", "window_tokens": a.window, "sink_tokens": 4,
        "cluster": {"variance_ratio": ratio}, "pool": {"capacity_bytes": a.pool_mb << 20, "slab_tokens": slab}})
    engine.open_stream("s")
    t0 = time.perf_counter()
    for k in range(0, a.frames, a.batch):
        n = min(a.batch, a.frames - k)
        engine.append_frames("s", [frames[(k + j) % len(frames)] for j in range(n)], [float(k + j) for j in range(n)])
    engine.streams["s"].cache.offload()  # tokens staged for offload are clustered too: storage of the whole past
    ingest_s = time.perf_counter() - t0
    info = engine.stream_info("s")
    index = engine.streams["s"].cache.retriever.index
    layout, pool = engine.layout, engine.pool
    count = index.count[index.count > 0]
    stored = int(count.sum())  # (token, group) rows stored
    used_slabs = int(pool.num_slabs - pool.free_slabs)
    row = 2 * layout.head_dim * torch.empty((), dtype=layout.dtype).element_size()
    past = int(info["past_tokens"])
    return {"variance_ratio": ratio, "slab_tokens": slab, "frames": a.frames, "past_tokens": past,
            "ingest_s": ingest_s, "clusters_per_group": count.numel() / layout.groups,
            "mean_cluster_tokens": float(count.float().mean()), "median_cluster_tokens": float(count.float().median()),
            "singleton_token_share": float(count[count == 1].sum()) / max(1, stored),
            "slab_fill": stored / max(1, used_slabs * pool.slab_tokens),
            "host_bytes": int(info["kv_bytes_host"]), "dense_kv_bytes": past * layout.groups * row,
            "index_device_bytes": int(index.metadata_bytes())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.set_defaults(window=64, pool_mb=6144, size=224)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--batch", type=int, default=4, help="frames per append call")
    p.add_argument("--ratios", default="0.15,0.5", help="variance_ratio values")
    p.add_argument("--slabs", default="16,4", help="slab_tokens values")
    a = p.parse_args(argv)
    cli.resolve(a)
    if a.quick:
        a.frames, a.ratios, a.slabs, a.pool_mb = 8, "0.15", "16,4", 256
    frames, source = real_frames(a.size, frames_file=a.frames_file)
    t0 = time.perf_counter()
    rows = []
    mach = report.machine()
    table = [f"Machine: {mach['device']}; model {a.model}; {a.frames} frames of {source} ({a.size}px); window {a.window}",
             "", "| variance_ratio | slab tokens | past tokens | mean cluster | singleton share | slab fill "
             "| host MB | host / dense K/V | index MB |", "|---|---|---|---|---|---|---|---|---|"]
    for ratio in (float(x) for x in a.ratios.split(",")):
        for slab in (int(x) for x in a.slabs.split(",")):
            r = measure(a, frames, ratio, slab)
            rows.append(r)
            table.append(f"| {ratio:g} | {slab} | {r['past_tokens']} | {r['mean_cluster_tokens']:.2f} | "
                         f"{r['singleton_token_share']:.2f} | {r['slab_fill']:.2f} | {r['host_bytes'] / 1e6:.0f} | "
                         f"{r['host_bytes'] / max(1, r['dense_kv_bytes']):.1f}x | {r['index_device_bytes'] / 1e6:.1f} |")
            result = {"bench": NAME, "machine": mach, "model": a.model, "video": source, "frame_px": a.size,
                      "window": a.window, "quick": a.quick, "wall_s": time.perf_counter() - t0, "rows": rows}
            report.publish(a.out, NAME, result, table)
    report.done(a.out, NAME, table, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
