"""What durability costs and how fast a stream is rebuilt, without Ray, per store (`--store`):
`disk` (`DiskFrameLog`, the runtime's) and `sqlite` (`frame_log_sqlite.SqliteFrameLog`, one SQLite
database in WAL mode, measured against it for issue 18; see docs/reliability.md); `sqlite-ckpt` is
the same with SQLite's automatic checkpoints off and a thread checkpointing every 100 ms.

1. append: one frame batch (--batch JPEG frames of --size px, as a client sends them) per append,
   for each fsync policy (sqlite: synchronous OFF / NORMAL / FULL): appends/s, MB/s, p50/p99
   latency of one append (what an acknowledgement waits for the log);
2. concurrent (--procs P > 1): P processes on one host, each appending its own stream to the same
   root (disk: P files; sqlite: one database) under "interval" and "always": total appends/s, p99;
3. replay: a --frames-frame log read back, JPEG-decoded and appended to the tests' fake engine
   (`log_replay.replay`, groups of 64): frames/s of the runtime's part of a rebuild, the read
   alone (read_s), and whether the records read equal those appended;
4. compaction: the same log with a `MarkRecord` --keep frames before its end, `truncate_before`
   it ("interval"): its time, the store's bytes on disk before and after (sqlite: also after
   `reclaim()`, which gives freed pages back to the file system).

    python scaling_bench/frame_log_cost.py                              # disk, ~20 s
    python scaling_bench/frame_log_cost.py --store disk,sqlite,sqlite-ckpt --rounds 3 --procs 2 \\
        --out docs/results/frame_log_sqlite.json                         # the comparison
    python scaling_bench/frame_log_cost.py --root /mnt/nfs/tmp          # shared storage
    python scaling_bench/frame_log_cost.py --store disk,sqlite --quick  # seconds (the test's)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray


POLICIES = ("never", "interval", "always")
STORES = ("disk", "sqlite", "sqlite-ckpt")  # sqlite-ckpt: checkpoints by a thread every 100 ms


def jpeg_frames(n: int, size: int) -> list:
    from mosaic_ray.runtime.durability.frame_codec import inspect

    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, size * size * 3).reshape(size, size, 3)
    out = []
    for i in range(n):
        img = np.clip(base + rng.normal(0, 20, base.shape) + 7 * i, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=85)
        out.append(inspect("jpeg", buf.getvalue(), 1 << 30))
    return out


def open_store(store: str, root: str, policy: str):
    if store == "disk":
        from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog

        return DiskFrameLog(root, policy, 100)
    if store in ("sqlite", "sqlite-ckpt"):
        from scaling_bench.harness.frame_log_sqlite import SqliteFrameLog

        return SqliteFrameLog(root, policy, checkpoint_ms=100 if store == "sqlite-ckpt" else 0)
    raise ValueError(f"unknown store {store!r} (one of {', '.join(STORES)})")


def store_bytes(log, stream_id: str) -> int:
    if hasattr(log, "file_bytes"):
        return log.file_bytes()
    return os.path.getsize(log.path(stream_id))


def frame_record(frames: list, seq: int, batch: int):
    from mosaic_ray.runtime.durability.frame_log import FrameRecord

    chunk = tuple(frames[(seq * batch + i) % len(frames)] for i in range(batch))
    return FrameRecord(seq, chunk, tuple(float(seq * batch + i) for i in range(batch)))


def timed_appends(log, stream_id: str, frames: list, batch: int, appends: int) -> tuple[list, float, int]:
    lat, nbytes = [], 0
    start = time.perf_counter()
    for seq in range(appends):
        rec = frame_record(frames, seq, batch)
        t0 = time.perf_counter()
        log.append(stream_id, [rec])
        lat.append(time.perf_counter() - t0)
        nbytes += sum(len(f.data) for f in rec.frames)
    return lat, time.perf_counter() - start, nbytes


def pct(lat: list, q: float) -> float:
    s = sorted(lat)
    return round(1e3 * s[min(len(s) - 1, int(len(s) * q))], 3)


def measure_appends(store: str, root: str, policy: str, frames: list, batch: int, appends: int) -> dict:
    log = open_store(store, f"{root}/{store}-{policy}", policy)
    lat, elapsed, nbytes = timed_appends(log, "bench", frames, batch, appends)
    log.close()
    return {"store": store, "fsync": policy, "appends_per_s": round(appends / elapsed, 1),
            "mb_per_s": round(nbytes / elapsed / 1e6, 1), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}


def _writer(store, root, policy, frames, batch, appends, k, barrier, out) -> None:
    log = open_store(store, root, policy)
    barrier.wait()
    lat, elapsed, _ = timed_appends(log, f"s{k}", frames, batch, appends)
    log.close()
    out.put((elapsed, lat))


def measure_concurrent(store: str, root: str, policy: str, frames: list, batch: int, appends: int,
                       procs: int) -> dict:
    """`procs` processes (as shards on one host), each appending its own stream to one root."""
    ctx = multiprocessing.get_context("fork")
    path = f"{root}/{store}-conc-{policy}"
    open_store(store, path, policy).close()  # create the database/directory before the race
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_writer, args=(store, path, policy, frames, batch, appends, k, barrier, out))
          for k in range(procs)]
    for p in ps:
        p.start()
    results = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join()
    wall = max(e for e, _ in results)
    lat = [x for _, xs in results for x in xs]
    return {"store": store, "fsync": policy, "procs": procs, "appends_per_s": round(procs * appends / wall, 1),
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}


def build_log(log, frames: list, total: int, batch: int, mark_at: int | None = None) -> list:
    """A stream `s`: OpenRecord, then `total` frames in `batch`-frame records, a MarkRecord(1) after
    the record holding frame `mark_at`; returns the records appended."""
    from mosaic_ray.runtime.durability.frame_log import MarkRecord, OpenRecord

    records = [OpenRecord(0.0)]
    log.append("s", records)
    for seq in range(total // batch):
        rec = [frame_record(frames, seq, batch)]
        if mark_at is not None and seq * batch <= mark_at < (seq + 1) * batch:
            rec.append(MarkRecord(1, seq))
        log.append("s", rec)
        records += rec
    log.sync()
    return records


def measure_replay(store: str, root: str, frames: list, total: int, batch: int) -> dict:
    from mosaic_ray.runtime.durability.frame_codec import decode_all
    from mosaic_ray.runtime.durability.log_replay import replay
    from tests.runtime.fake_engine import FakeEngine

    log = open_store(store, f"{root}/{store}-replay", "never")
    appended = build_log(log, frames, total, batch)
    engine = FakeEngine()
    engine.open_stream("s")

    async def go():
        t0 = time.perf_counter()
        records = list(log.read("s"))
        t_read = time.perf_counter() - t0

        async def append(f, t):
            return engine.append_frames("s", f, t)

        async def text(x, ts):
            engine.append_text("s", x, ts)

        async def decode(f):
            return await asyncio.to_thread(decode_all, f)

        done = await replay(records, append, text, decode, 64)
        return records, done, t_read, time.perf_counter() - t0

    records, done, t_read, elapsed = asyncio.run(go())
    log.close()
    mb = sum(len(f.data) for r in appended[1:] for f in r.frames) / 1e6
    return {"store": store, "frames": done.frames, "read_s": round(t_read, 3),
            "read_mb_per_s": round(mb / max(t_read, 1e-9), 1), "seconds": round(elapsed, 2),
            "frames_per_s": round(done.frames / elapsed, 1), "engine_calls": done.engine_calls,
            "records_equal": records == appended}


def measure_compaction(store: str, root: str, frames: list, total: int, batch: int, keep: int) -> dict:
    from mosaic_ray.runtime.durability.frame_log import MarkRecord

    log = open_store(store, f"{root}/{store}-compact", "interval")
    appended = build_log(log, frames, total, batch, mark_at=total - keep)
    before = store_bytes(log, "s")
    t0 = time.perf_counter()
    dropped = log.truncate_before("s", 1)
    seconds = time.perf_counter() - t0
    after = store_bytes(log, "s")
    out = {"store": store, "frames": total, "kept_frames": keep, "records_dropped": dropped,
           "seconds": round(seconds, 4), "bytes_before": before, "bytes_after": after}
    if hasattr(log, "reclaim"):
        t0 = time.perf_counter()
        log.reclaim()
        out["reclaim_seconds"] = round(time.perf_counter() - t0, 4)
        out["bytes_after_reclaim"] = store_bytes(log, "s")
    at = next(i for i, r in enumerate(appended) if isinstance(r, MarkRecord))
    out["tail_equal"] = list(log.read("s")) == appended[at:]
    log.close()
    return out


def run_round(stores: list, root: str, frames: list, a) -> dict:
    rows, conc, rep, comp = [], [], [], []
    for store in stores:
        rows += [measure_appends(store, root, pol, frames, a.batch, a.appends) for pol in POLICIES]
        if a.procs > 1:
            conc += [measure_concurrent(store, root, pol, frames, a.batch, a.appends, a.procs)
                     for pol in ("interval", "always")]
        rep.append(measure_replay(store, root, frames, a.frames, a.batch))
        comp.append(measure_compaction(store, root, frames, a.frames, a.batch, a.keep))
    out = {"appends": rows, "replay": rep, "compaction": comp}
    if conc:
        out["concurrent"] = conc
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="directory for the logs (default: a temp dir)")
    p.add_argument("--store", default="disk", help=f"comma-separated stores: {', '.join(STORES)}")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--appends", type=int, default=300)
    p.add_argument("--frames", type=int, default=3600, help="frames in the replayed log (1 h at 1 fps)")
    p.add_argument("--keep", type=int, default=600, help="frames after the mark in the compacted log")
    p.add_argument("--procs", type=int, default=1, help="concurrent writer processes (1: skip)")
    p.add_argument("--rounds", type=int, default=1, help="repeat everything (a shared machine is noisy)")
    p.add_argument("--quick", action="store_true", help="seconds: 20 appends, 160-frame logs")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if a.quick:
        a.appends, a.frames, a.keep = 20, 160, 40
    stores = [s.strip() for s in a.store.split(",") if s.strip()]
    for s in stores:
        if s not in STORES:
            p.error(f"unknown store {s!r} (one of {', '.join(STORES)})")
    root = tempfile.mkdtemp(prefix="flc-", dir=a.root)
    try:
        frames = jpeg_frames(32, a.size)
        kb = sum(len(f.data) for f in frames) / len(frames) / 1e3
        rounds = []
        for r in range(a.rounds):
            rounds.append(run_round(stores, f"{root}/r{r}", frames, a))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"jpeg_kb": round(kb, 1), "batch": a.batch, "appends_per_policy": a.appends, "frames": a.frames,
              "keep": a.keep, "stores": stores, "sqlite_version": sqlite3.sqlite_version,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average": [round(x, 1) for x in os.getloadavg()]},
              "command": " ".join(["python", "scaling_bench/frame_log_cost.py", *(argv or sys.argv[1:])])}
    result.update(rounds[0] if a.rounds == 1 else {"rounds": rounds})
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
