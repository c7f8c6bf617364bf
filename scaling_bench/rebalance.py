"""Rebalancing between shards (one GPU each): streams skewed onto shard 0, moved by the router
over torch.distributed (NCCL between GPUs, gloo on CPU); the load of every shard before and after,
the time of each move (s, GB/s, s per stream-hour of KV) and answers identical after a move.

--streams streams are opened on shard 0, each with a twin fed the same --frames real frames;
rounds of `router.rebalance()` run until one moves nothing; then --migrations explicit
`router.migrate()` calls are timed; finally the same greedy question goes to every stream and its
twin (a moved one against one that never moved: the answers must be equal). On a CPU machine the
shards are logical GPUs sharing the cores (`scaling_bench/harness/rebalance.py` has the logic).

    python scaling_bench/rebalance.py --shards 2 --frames-file scratch/frames_336.npz     # 2-GPU host
    python scaling_bench/rebalance.py --quick --out /tmp/r                                # CPU, < 1 min
    ray job submit --working-dir . -- python scaling_bench/rebalance.py --quick --out /tmp/r  # --out absolute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from scaling_bench.harness import cli, report  # noqa: E402
from scaling_bench.harness.engines import engine_kwargs, runtime_config  # noqa: E402
from scaling_bench.harness.rebalance import SkewSpec, measure  # noqa: E402
from scaling_bench.harness.serve_stack import bench_stack  # noqa: E402
from scaling_bench.harness.video_frames import real_frames  # noqa: E402

NAME = "rebalance"


def plot(result: dict, path) -> None:
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = result["shard_names"]
    xs = range(len(names))
    for k, (key, label) in enumerate((("loads_before", "before"), ("loads_after", "after rebalance"))):
        score = {r["shard"]: r["score"] for r in result[key]}
        axes[0].bar([x + 0.4 * k - 0.2 for x in xs], [score.get(n, 0.0) for n in names], 0.4, label=label)
    axes[0].set_xticks(list(xs), [n.rsplit(":", 1)[-1] for n in names])
    axes[0].set_xlabel("shard")
    axes[0].set_title("load score per shard")
    axes[0].legend()
    moves = result["moves"]
    axes[1].bar(range(len(moves)), [m["seconds"] for m in moves])
    axes[1].set_xticks(range(len(moves)), [m["stream"] for m in moves], rotation=30)
    axes[1].set_title("explicit migrate(): seconds per move")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def kv_mib(load: dict) -> float:
    return (load.get("kv_bytes_host", 0) + load.get("kv_bytes_device", 0)) / 2**20


def table(r: dict) -> list[str]:
    m = r["machine"]
    where = (f"{m['device']} x {r['cards']}" if m["gpu"] else f"{m['device']}, {r['shards']} logical GPUs")
    reb = r["rebalance"]
    lines = [f"Machine: {where}; {r['shards']} shards; model {r['model']} on {r['engine_device']}; {r['method']} "
             f"retrieval; transport {r['transport']}; {r['streams']} streams + {r['streams']} twins on shard 0, "
             f"{r['frames']} frames each of {r['video']} ({r['frame_px']}px) at {r['fps']:g} frame/s of stream "
             f"time", "",
             f"Rebalance: {len(reb['moves'])} moves in {len(reb['rounds'])} round(s), {reb['wall_s']:.2f} s "
             f"({reb['wall_s'] / max(1, len(reb['moves'])):.2f} s per move); "
             f"imbalance (max / mean score) {r['imbalance_before']:.2f} -> {r['imbalance_after']:.2f}", "",
             "| shard | streams before | score before | KV MiB before | streams after | score after | KV MiB after |",
             "|---|---|---|---|---|---|---|"]
    after = {x["shard"]: x for x in r["loads_after"]}
    for b in r["loads_before"]:
        a = after.get(b["shard"], {})
        lines.append(f"| {b['shard']} | {b['streams']} | {b['score']:.2f} | {kv_mib(b):.1f} | {a.get('streams', 0)} | "
                     f"{a.get('score', 0.0):.2f} | {kv_mib(a):.1f} |")
    lines += ["", "| explicit move | source -> target | transport | s | KV MiB | GB/s | s per stream-hour |",
              "|---|---|---|---|---|---|---|"]
    for mv in r["moves"]:
        lines.append(f"| {mv['stream']} | {mv['source']} -> {mv['target']} | {mv['transport']} | {mv['seconds']:.3f} "
                     f"| {mv['kv_bytes'] / 2**20:.1f} | {mv['gb_per_s']:.3f} | {mv['s_per_stream_hour']:.0f} |")
    lines += phase_table(r["moves"])
    ident = r["identity"]
    differ = [" / ".join(x["pair"]) for x in ident if not x["equal"]]
    lines += ["", f"Identity (greedy, {r['max_tokens']} tokens, answer text): "
                  f"{sum(x['equal'] for x in ident)}/{len(ident)} pairs equal, "
                  f"{r['identity_moved_vs_unmoved']} of them moved vs never moved; "
                  f"{r['distinct_answers']} distinct answer(s) over the {len(ident)} pairs"
                  + (f"; DIFFER: {', '.join(differ)}" if differ else "")]
    return lines


PHASES = (("freeze_s", "freeze"), ("export_s", "export"), ("source_fingerprint_s", "fingerprint (source)"),
          ("receive_connect_s", "connect"), ("receive_transfer_s", "transfer"),
          ("receive_fingerprint_s", "fingerprint (target)"), ("import_s", "import"), ("total_s", "total"))


def phase_table(moves: list[dict]) -> list[str]:
    """Seconds per phase of each explicit move, as the shards measured them (runs before the
    phases were reported have none)."""
    moves = [m for m in moves if m.get("phases")]
    if not moves:
        return []
    lines = ["", "| explicit move | " + " | ".join(label for _, label in PHASES) + " | bytes by backend |",
             "|---" * (len(PHASES) + 2) + "|"]
    for mv in moves:
        ph = mv["phases"]
        by = ", ".join(f"{k.removeprefix('receive_bytes_')} {v / 2**20:.0f} MiB" for k, v in ph.items()
                       if k.startswith("receive_bytes_"))
        lines.append(f"| {mv['stream']} | " + " | ".join(f"{ph.get(k, 0.0):.3f}" for k, _ in PHASES) + f" | {by} |")
    return lines


def publish(out: str, result: dict) -> list[str]:
    return report.publish(out, NAME, result, table(result), plot=lambda _rows, path: plot(result, path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    # 2 x --streams streams on one shard before the rebalance. Host KV per frame at 7b-shape (336 px,
    # 144 tokens): ~8.6 MB dense (token); ~130 MB for cluster with the random-init weights, whose
    # keys form singleton clusters, one 16-token slab each. The defaults fit a 16 GiB pool with
    # either; the token run of docs/benchmarks.md section 8 used --streams 4 --frames 60.
    p.set_defaults(pool_mb=None)
    p.add_argument("--method", default="cluster", help="retrieval method of every shard")
    p.add_argument("--shards", type=int, default=None, help="default: the GPUs of this machine (at least 2)")
    p.add_argument("--streams", type=int, default=2, help="measured streams on shard 0 (each has a twin there too)")
    p.add_argument("--frames", type=int, default=16, help="frames per stream")
    p.add_argument("--batch", type=int, default=8, help="frames per append call")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second of stream time (a 1 frame/s camera)")
    p.add_argument("--migrations", type=int, default=2, help="explicit migrate() calls timed after the rebalance")
    p.add_argument("--max-rounds", type=int, default=8, help="rebalancing rounds at most")
    p.add_argument("--transport", default="distributed", choices=["distributed", "object_store", "auto"])
    p.add_argument("--from-json", default=None, help="re-render the table and plot of an earlier run's JSON")
    a = p.parse_args(argv)
    cli.resolve(a)
    if a.quick:  # 2 logical shards, 2 streams + 2 twins of 8 frames
        a.shards = a.shards or 2
        a.streams, a.frames, a.batch, a.migrations = 2, 8, 4, 2
    if a.from_json:
        result = json.loads(Path(a.from_json).read_text())
        print("\n".join(publish(a.out, result)))
        return 0
    a.shards = max(2, a.shards or report.gpu_count())
    a.pool_mb = a.pool_mb or (16384 if a.device == "cuda" else 8192)
    frames, source = real_frames(a.size, frames_file=a.frames_file)
    spec = SkewSpec(streams=a.streams, frames=a.frames, batch=a.batch, fps=a.fps, migrations=a.migrations,
                    max_rounds=a.max_rounds, max_tokens=a.max_tokens, transport=a.transport)
    cfg = runtime_config("rebalance", a.shards, engine_kwargs(a.method, a.model, a.device, a.window, a.pool_mb))
    cfg["migration"] = {"transport": a.transport, "timeout_s": 300.0}
    t0 = time.perf_counter()
    with bench_stack(num_gpus=a.shards) as stack:
        try:
            stack.runtime(cfg)
            if not a.no_progress:
                print(f"  runtime of {a.shards} shards up in {time.perf_counter() - t0:.1f} s", flush=True)
            measured = asyncio.run(measure(cfg, spec, frames, not a.no_progress))
        finally:
            stack.drop(cfg)
    mach = report.machine()
    result = {"bench": NAME, "machine": mach, "cards": report.gpu_count(), "shards": a.shards, "model": a.model,
              "engine_device": a.device, "method": a.method, "transport": a.transport, "video": source,
              "frame_px": a.size, "streams": a.streams, "frames": a.frames, "batch_frames": a.batch, "fps": a.fps,
              "max_tokens": a.max_tokens, "quick": a.quick, "wall_s": time.perf_counter() - t0,
              "rows": measured["loads_before"], **measured}
    report.done(a.out, NAME, publish(a.out, result), result["wall_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
