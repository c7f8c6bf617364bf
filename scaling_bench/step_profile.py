"""Where the engine's step loop spends a live load's time, in-process (no Ray, no HTTP).

S streams of real frames at --fps per wall second, a --max-tokens question every --question-every
s per stream, driven as a shard drives the engine (`StreamEngine.ingest_frames`, `ask`: the
`EngineTarget` of the load generator). Per stream count: ingest lag, TTFT and answer latency as in
streams_per_gpu.py, and the step loop's own accounting: steps, seconds in question steps, ingest
forwards and maintenance, frames per ingest forward, decode / prefill / ingest tokens. With
--profile-steps N, a torch.profiler table of N ingest forwards of the largest count.

    python scaling_bench/step_profile.py --methods cluster --streams 16,32 --out docs/results/gpu/h200   # GPU
    python scaling_bench/step_profile.py --quick --out /tmp/r                                        # CPU
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from scaling_bench.harness import cli, report  # noqa: E402
from scaling_bench.harness.engines import engine_kwargs  # noqa: E402
from scaling_bench.harness.load_gen import LoadSpec, run_load  # noqa: E402
from scaling_bench.harness.targets import EngineTarget  # noqa: E402
from scaling_bench.harness.video_frames import real_frames  # noqa: E402

NAME = "step_profile"
PARTS = ("question_s", "ingest_s", "maintenance_s")


def measure(a: argparse.Namespace, method: str, n: int, frames) -> dict:
    from mosaic_ray.engine.stream_engine import StreamEngine

    engine = StreamEngine.from_spec(**engine_kwargs(method, a.model, a.device, a.window, a.pool_mb))
    spec = LoadSpec(streams=n, seconds=a.seconds, fps=a.fps, question_every_s=a.question_every,
                    max_tokens=a.max_tokens, warmup_s=a.warmup, prefix=f"{method}-{n}")

    async def go():
        before = {}

        async def snapshot():  # the loop's counters once the warm-up is over
            await asyncio.sleep(a.warmup)
            before.update(engine.loop.counters, busy=engine.stats()["busy_s_total"], t=time.perf_counter())

        snap = asyncio.create_task(snapshot())
        res = await run_load(EngineTarget(engine), spec, frames, not a.no_progress, f"{method} x{n}")
        await snap
        after = {**engine.loop.counters, "busy": engine.stats()["busy_s_total"], "t": time.perf_counter()}
        return res, {k: after[k] - before[k] for k in after}

    res, d = asyncio.run(go())
    wall = d.pop("t")
    row = {"method": method, **res.summary(), "sustained": res.sustained(a.max_lag_s, a.max_ttft_s),
           "loop": d, "measured_s": wall, "engine_busy_share": d["busy"] / wall,
           "frames_per_ingest_step": d["ingest_frames"] / max(1, d["ingest_steps"]),
           **{f"{p}_share": d[p] / wall for p in PARTS}}
    print(f"  {method:8s} {n:4d} streams: lag p99 {row['lag']['p99_ms']:7.0f} ms, TTFT p50/p99 "
          f"{row['ttft']['p50_ms']:5.0f}/{row['ttft']['p99_ms']:5.0f} ms, answer p50 {row['e2e']['p50_ms']:5.0f} ms, "
          f"{row['ingest_fps']:5.1f} frames/s; steps {d['steps']}, busy {row['engine_busy_share']:.0%} "
          f"(questions {row['question_s_share']:.0%}, ingest {row['ingest_s_share']:.0%}, maintenance "
          f"{row['maintenance_s_share']:.0%}, of it offloads {d.get('offload_s', 0.0) / wall:.0%}), "
          f"{row['frames_per_ingest_step']:.1f} frames per ingest forward, "
          f"{1e3 * d['ingest_s'] / max(1, d['ingest_steps']):.1f} ms each; {d.get('offloads', 0)} offloads "
          f"({d.get('offloaded_tokens', 0)} tokens), {d['splits']} splits", flush=True)
    if (a.profile_steps or a.profile_seconds) and n == max(int(x) for x in a.streams.split(",")):
        row["profile"] = profile_steps(engine, a, method, frames)
    return row


def profile_steps(engine, a, method: str, frames) -> str:
    """torch.profiler over `--profile-steps` ingest forwards of the loop (from `--profile-after` s
    into a fresh load of the same streams, once their windows are full): where an ingest goes."""
    import torch

    spec = LoadSpec(streams=max(int(x) for x in a.streams.split(",")), seconds=a.profile_after + a.profile_seconds + 4, fps=a.fps,
                    question_every_s=a.question_every, max_tokens=a.max_tokens, warmup_s=0, prefix=f"{method}-prof")
    loop, done = engine.loop, []
    real_ingest = loop._ingest
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = torch.profiler.profile(activities=acts)

    def ingest(take):
        if not done and time.perf_counter() - t0 > a.profile_after:
            prof.start()
            done.append(0)
        if not done or done[0] >= a.profile_steps:
            return real_ingest(take)
        out = real_ingest(take)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        done[0] += 1
        if done[0] == a.profile_steps:
            prof.stop()
        return out

    syncs = SyncSites()

    async def window():  # --profile-seconds: everything the engine does for S seconds
        await asyncio.sleep(a.profile_after)
        prof.start()
        if a.sync_sites:
            syncs.start()
        done.append(a.profile_steps)
        await asyncio.sleep(a.profile_seconds)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        syncs.stop()
        prof.stop()

    async def go():
        timer = asyncio.create_task(window()) if a.profile_seconds else None
        await run_load(EngineTarget(engine), spec, frames, False, "profile")
        if timer is not None:
            await timer

    if not a.profile_seconds:
        loop._ingest = ingest
    t0 = time.perf_counter()
    asyncio.run(go())
    loop._ingest = real_ingest
    if a.profile_seconds:
        done[:] = [a.profile_steps] if done else []
    if done and done[0] < a.profile_steps:
        prof.stop()
    if not done:
        return "no ingest forward after --profile-after"
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=70)
    gpu = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70) \
        if torch.cuda.is_available() else ""
    what = f"{a.profile_seconds:g} s of the engine" if a.profile_seconds else f"{done[0]} ingest forwards"
    sites = f"\n\nhost syncs by call site (torch.cuda sync debug mode):\n{syncs.table()}" if a.sync_sites else ""
    ranges = f"\n\nGPU time by range and kernel:\n{gpu_by_range(prof.events())}" if torch.cuda.is_available() else ""
    return f"{what}\n\nby CPU total:\n{cpu}\n\nby CUDA total:\n{gpu}{ranges}{sites}"


def kernel_name(name: str) -> str:
    """A CUDA kernel's name without its template arguments, with the functor that tells one
    elementwise kernel from another (`vectorized_elementwise_kernel[MulFunctor]`)."""
    base = re.split(r"[<(]", name.removeprefix("void "), maxsplit=1)[0].split("::")[-1]
    functors = [f for f in re.findall(r"(\w+(?:Functor|_functor|Op|_kernel_cuda))\b", name) if f != base]
    return f"{base}[{functors[-1]}]" if functors else base[:80]


def gpu_by_range(events, limit: int = 45) -> str:
    """Where the GPU's time went: every kernel (and copy) charged to the innermost
    `record_function` range around it on the GPU's timeline, then summed by range path and by
    (range, kernel). The profiler's own tables charge a kernel to every range above it."""
    from torch.autograd import DeviceType

    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in gpu if e.is_user_annotation)
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in gpu if not e.is_user_annotation)
    if not kernels:
        return "(no kernels recorded)"
    by_path: dict[str, float] = {}
    by_kernel: dict[tuple[str, str], list[float]] = {}
    open_, i, busy, last_end = [], 0, 0.0, float("-inf")
    for start, end, name in kernels:
        while i < len(spans) and spans[i][0] <= start:
            open_.append(spans[i])
            i += 1
        open_ = [s for s in open_ if s[1] >= end]  # ranges still around this kernel, outermost first
        path = "/".join(s[2] for s in open_) or "(no range)"
        dur = end - start
        by_path[path] = by_path.get(path, 0.0) + dur
        row = by_kernel.setdefault((open_[-1][2] if open_ else "(no range)", kernel_name(name)), [0.0, 0])
        row[0] += dur
        row[1] += 1
        busy += max(0.0, end - max(start, last_end))
        last_end = max(last_end, end)
    window = kernels[-1][1] - kernels[0][0]
    total = sum(by_path.values())
    lines = [f"GPU busy {busy / 1e3:.0f} ms of {window / 1e3:.0f} ms ({busy / max(window, 1e-9):.0%}); kernel time {total / 1e3:.0f} ms",
             "", f"{'ms':>9} {'share':>6}  range path"]
    for path, us in sorted(by_path.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"{us / 1e3:9.1f} {us / total:6.1%}  {path}")
    lines += ["", f"{'ms':>9} {'share':>6} {'calls':>7} {'us/call':>8}  innermost range :: kernel"]
    for (rng, kern), (us, n) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:limit]:
        lines.append(f"{us / 1e3:9.1f} {us / total:6.1%} {n:7d} {us / n:8.1f}  {rng} :: {kern}")
    return "\n".join(lines)


class SyncSites:
    """Counts the host syncs the engine makes, by call site: torch's CUDA sync debug mode warns at
    every synchronizing call (`.item()`, `.tolist()`, `nonzero`, a blocking copy from pageable
    memory) and the warning's stack says which line of ours made it."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], int] = {}
        self._saved = None

    def start(self) -> None:
        import traceback
        import warnings

        import torch

        if not torch.cuda.is_available():
            return

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return self._saved[0](message, category, filename, lineno, file, line)
            ours = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                    if "mosaic_ray" in f.filename or "transformers" in f.filename]
            key = tuple(ours[-3:]) or (f"{Path(filename).name}:{lineno}",)
            self.counts[key] = self.counts.get(key, 0) + 1

        self._saved = (warnings.showwarning, warnings.filters[:])
        warnings.showwarning = show
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        import warnings

        import torch

        if self._saved is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning, warnings.filters[:] = self._saved
        self._saved = None

    def table(self, limit: int = 40) -> str:
        if not self.counts:
            return "(none recorded: no GPU, or no sync)"
        rows = sorted(self.counts.items(), key=lambda kv: -kv[1])[:limit]
        total = sum(self.counts.values())
        return "\n".join([f"{total} syncs at {len(self.counts)} call sites (innermost last):"]
                         + [f"{n:7d}  {' <- '.join(reversed(k))}" for k, n in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--methods", default="cluster")
    p.add_argument("--streams", default="16,32", help="stream counts, one fresh engine each")
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--question-every", type=float, default=8.0)
    p.add_argument("--max-lag-s", type=float, default=2.0)
    p.add_argument("--max-ttft-s", type=float, default=1.0)
    p.add_argument("--profile-steps", type=int, default=0,
                   help="torch.profiler table of N ingest forwards of the largest count (a fresh load)")
    p.add_argument("--profile-after", type=float, default=20.0, help="seconds into that load (windows filled)")
    p.add_argument("--profile-seconds", type=float, default=0.0,
                   help="instead: profile everything the engine does for S seconds from --profile-after")
    p.add_argument("--sync-sites", action="store_true",
                   help="with --profile-seconds: also count the host syncs by call site (CUDA only)")
    a = p.parse_args(argv)
    cli.resolve(a)
    if a.quick:
        a.streams, a.fps, a.seconds, a.warmup, a.question_every, a.profile_after = "2", 4.0, 4.0, 1.0, 1.0, 1.0
    frames, source = real_frames(a.size, frames_file=a.frames_file)
    t0 = time.perf_counter()
    result = {"bench": NAME, "machine": report.machine(), "model": a.model, "engine_device": a.device,
              "video": source, "frame_px": a.size, "fps_per_stream": a.fps, "seconds": a.seconds,
              "question_every_s": a.question_every, "max_tokens": a.max_tokens, "window_tokens": a.window,
              "quick": a.quick, "wall_s": 0.0, "rows": []}
    table = []
    for m in a.methods.split(","):
        for n in [int(x) for x in a.streams.split(",")]:
            result["rows"].append(measure(a, m, n, frames))
            result["wall_s"] = time.perf_counter() - t0
            table = publish(a.out, result)
    for r in result["rows"]:
        if "profile" in r:
            Path(a.out, f"{NAME}_{r['method']}_{r['streams']}_profile.txt").write_text(r.pop("profile"))
    table = publish(a.out, result)
    report.done(a.out, NAME, table, result["wall_s"])
    return 0


def publish(out: str, result: dict) -> list[str]:
    r0 = result
    table = [f"Machine: {r0['machine']['device']}; model {r0['model']} on {r0['engine_device']}; in-process engine; "
             f"{r0['frame_px']}px frames at {r0['fps_per_stream']:g} frame/s per stream; a {r0['max_tokens']}-token "
             f"question every {r0['question_every_s']:g} s per stream; {r0['seconds']:g} s per point", "",
             "| method | streams | lag p99 ms | TTFT p50 / p99 ms | answer p50 ms | frames/s | steps | engine busy "
             "| question steps | ingest forwards | maintenance (offloads) | frames per ingest forward | ms per ingest forward |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        d = r["loop"]
        table.append(f"| {r['method']} | {r['streams']} | {r['lag']['p99_ms']:.0f} | {r['ttft']['p50_ms']:.0f} / "
                     f"{r['ttft']['p99_ms']:.0f} | {r['e2e']['p50_ms']:.0f} | {r['ingest_fps']:.1f} | {d['steps']:.0f} | "
                     f"{r['engine_busy_share']:.0%} | {r['question_s_share']:.0%} | {r['ingest_s_share']:.0%} | "
                     f"{r['maintenance_s_share']:.0%} ({d.get('offload_s', 0.0) / r['measured_s']:.0%}) | "
                     f"{r['frames_per_ingest_step']:.1f} | "
                     f"{1e3 * d['ingest_s'] / max(1, d['ingest_steps']):.1f} |")
    return report.publish(out, NAME, {k: v for k, v in result.items()}, table, plot)


def plot(rows, path) -> None:
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['method']} x{r['streams']}" for r in rows]
    bottom = [0.0] * len(rows)
    for p in PARTS:
        vals = [r[f"{p}_share"] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=p.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("share of wall time")
    ax.set_title("engine step loop: where the time goes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
