"""Rebuild of one stream from its whole log against snapshot + tail, with a real engine; and what
compaction does to the log's size (docs/reliability.md, "Snapshots and compaction").

1. live: F frames (JPEG, --size px, as clients send them) ingested in --batch-frame appends, each
   logged to a `DiskFrameLog` first, as a shard does; after --snapshot-at frames the stream is
   snapshotted as `StreamSnapshots.take` does (export, mark, encode, write, read back), timed;
2. full replay: a fresh stream rebuilt from the whole log (`log_replay.replay`), as before snapshots;
3. the log is compacted to the mark (sizes before/after), then the stream is rebuilt as
   `recover_stream` does now: `plan_rebuild` (read log + snapshot, decode), `import_stream`,
   replay of the tail only.
With --incremental D: the snapshot at --snapshot-at is a base (`export_delta(stream, 0)`), and a
delta follows every D frames until the end (as `StreamSnapshots` writes them; the log is
compacted to the base only); each delta's bytes are reported beside a whole snapshot taken at
the same point, and step 3 imports base + deltas (`import_deltas`) and replays the tail after the
last delta.
Checks that both rebuilt streams hold what the live one held (frames, tokens); reports whether a
greedy answer to one question is the same (replay regroups frames into --replay-batch calls, which
can change clustering on long streams, snapshot or not).

    python scaling_bench/snapshot_recovery.py --quick                 # CPU, tiny model
    python scaling_bench/snapshot_recovery.py --quick --incremental 32   # base + deltas every 32 frames
    python scaling_bench/snapshot_recovery.py --model 7b-shape --device cuda --frames 3600 --snapshot-at 3000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import types
from pathlib import Path

try:
    import ray  # noqa: F401
except ImportError:  # a GPU machine without Ray; runtime.errors only needs this name
    stub, exceptions = types.ModuleType("ray"), types.ModuleType("ray.exceptions")
    exceptions.RayTaskError = type("RayTaskError", (Exception,), {"cause": None})
    stub.exceptions = exceptions
    sys.modules.update({"ray": stub, "ray.exceptions": exceptions})

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from mosaic_ray.engine.interface import AskRequest  # noqa: E402
from mosaic_ray.runtime.durability.frame_codec import decode_all  # noqa: E402
from mosaic_ray.runtime.durability.frame_log import FrameRecord, MarkRecord, OpenRecord  # noqa: E402
from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog  # noqa: E402
from mosaic_ray.runtime.durability.log_replay import replay  # noqa: E402
from mosaic_ray.runtime.durability.snapshot_codec import encode_chunks  # noqa: E402
from mosaic_ray.runtime.actors.snapshots import plan_rebuild, write_verified  # noqa: E402
from scaling_bench.harness import report  # noqa: E402
from scaling_bench.harness.timing import sync  # noqa: E402
from scaling_bench.replay_rate import engine, jpegs  # noqa: E402

SID = "cam"
QUESTION = AskRequest(question="What happens in the video?", max_tokens=8)


async def answer(eng, sid: str) -> str:
    return "".join([d async for d in eng.ask(sid, QUESTION)])


def info(eng, sid: str) -> dict:
    i = eng.stream_info(sid)
    return {"frames": i["frames"], "tokens": i["tokens"]}


def take_delta(eng, log, a, seq: int, since: int, index: int, at_frame: int) -> dict:
    """A delta as `StreamSnapshots` writes one (export, mark, encode, write, read back), and the
    bytes a whole snapshot would have written at the same point."""
    sync(a.device)
    t0 = time.perf_counter()
    state = eng.export_delta(SID, since)
    t1 = time.perf_counter()
    mark = 1 + index
    log.append(SID, [MarkRecord(mark, seq)])
    nbytes = write_verified(log, SID, mark, encode_chunks(state, mark, seq, base=1, index=index), index)
    t2 = time.perf_counter()
    whole = sum(memoryview(c).nbytes for c in encode_chunks(eng.export_stream(SID), mark, seq))  # counted, not kept
    return {"at_frame": at_frame, "bytes": nbytes, "whole_bytes": whole, "ratio": round(nbytes / whole, 4),
            "export_s": round(t1 - t0, 3), "encode_write_verify_s": round(t2 - t1, 3),
            "generation": state["meta"]["generation"]}


def tensor_bytes(state: dict, top: int = 16) -> dict[str, int]:
    """The part's largest tensors, bytes each (what a snapshot is made of)."""
    sizes = {n: t.numel() * t.element_size() for n, t in state["tensors"].items()}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:top])


async def rebuild(eng, records, sid: str, replay_batch: int, last_seq: int = -1):
    async def call_text(text, ts):
        eng.append_text(sid, text, ts)

    async def frames(f, t):
        return eng.append_frames(sid, f, t)

    async def decode(fr):
        return await asyncio.to_thread(decode_all, fr)

    return await replay(records, frames, call_text, decode, replay_batch, last_seq=last_seq)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=1200)
    p.add_argument("--snapshot-at", type=int, default=1000, help="frames in the snapshot; the rest is the tail")
    p.add_argument("--batch", type=int, default=8, help="frames per live append (one log record)")
    p.add_argument("--replay-batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--unique", type=int, default=64, help="distinct JPEGs, cycled")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--pool-mb", type=int, default=16384)
    p.add_argument("--quick", action="store_true", help="tiny model, 600 frames, snapshot at 480")
    p.add_argument("--incremental", type=int, default=0, metavar="D",
                   help="a base at --snapshot-at, then a delta every D frames (0: one whole snapshot)")
    p.add_argument("--question-every", type=int, default=0, metavar="N",
                   help="a question after every N frames of live ingest (text units and co-activation in the snapshot)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.quick:
        a.model, a.frames, a.snapshot_at, a.pool_mb = "tiny", 600, 480, 1024
    pics = jpegs(a.unique, a.size, 0)
    frames = [pics[i % a.unique] for i in range(a.frames)]
    root = Path(tempfile.mkdtemp(prefix="snaprec-"))
    log = DiskFrameLog(root, "never")
    eng = engine(a)

    # 1. live ingest, logged; the snapshot at --snapshot-at frames
    eng.open_stream(SID)
    log.append(SID, [OpenRecord(0.0)])
    decoded = decode_all(frames)
    snap: dict = {}
    deltas: list[dict] = []
    generation = None
    start = time.perf_counter()
    for seq, i in enumerate(range(0, a.frames, a.batch)):
        chunk = slice(i, min(i + a.batch, a.frames))
        stamps = [float(t) for t in range(chunk.start, chunk.stop)]
        log.append(SID, [FrameRecord(seq, tuple(frames[chunk]), tuple(stamps))])
        eng.append_frames(SID, decoded[chunk], stamps)
        if a.question_every and chunk.stop % a.question_every < a.batch:
            asyncio.run(answer(eng, SID))
        if chunk.stop == a.snapshot_at:
            sync(a.device)
            t0 = time.perf_counter()
            state = eng.export_delta(SID, 0) if a.incremental else eng.export_stream(SID)
            generation = state["meta"].get("generation")
            t1 = time.perf_counter()
            t2 = time.perf_counter()
            log.append(SID, [MarkRecord(1, seq)])
            nbytes = write_verified(log, SID, 1, encode_chunks(state, 1, seq))  # streamed, as a shard does
            snap = {"export_s": round(t1 - t0, 3), "encode_write_verify_s": round(time.perf_counter() - t2, 3),
                    "bytes": nbytes, "tensor_bytes": tensor_bytes(state), "stream": eng.stream_info(SID)}
        elif a.incremental and generation is not None and chunk.stop > a.snapshot_at \
                and (chunk.stop - a.snapshot_at) % a.incremental == 0 and chunk.stop < a.frames:
            deltas.append(take_delta(eng, log, a, seq, generation, len(deltas) + 1, chunk.stop))
            generation = deltas[-1].pop("generation")
    sync(a.device)
    live_s = time.perf_counter() - start
    want = info(eng, SID)
    want_answer = asyncio.run(answer(eng, SID))
    eng.close_stream(SID)

    # 2. full replay of the whole log
    log_bytes = log.path(SID).stat().st_size
    start = time.perf_counter()
    records = list(log.read(SID))
    eng.open_stream(SID)
    asyncio.run(rebuild(eng, records, SID, a.replay_batch))
    sync(a.device)
    full_s = time.perf_counter() - start
    full = info(eng, SID)
    full_answer = asyncio.run(answer(eng, SID))
    eng.close_stream(SID)

    # 3. compaction, then snapshot + tail
    start = time.perf_counter()
    dropped = log.truncate_before(SID, 1)
    compact_s = time.perf_counter() - start
    compact_bytes = log.path(SID).stat().st_size
    start = time.perf_counter()
    plan = plan_rebuild(log, SID)
    t1 = time.perf_counter()
    eng.import_deltas(SID, plan.parts)
    sync(a.device)
    t2 = time.perf_counter()
    done = asyncio.run(rebuild(eng, plan.records, SID, a.replay_batch, plan.last_seq))
    sync(a.device)
    snap_s = time.perf_counter() - start
    got = info(eng, SID)
    got_answer = asyncio.run(answer(eng, SID))
    log.close()
    same = want == full == got
    out = {"model": a.model, "device": a.device, "frames": a.frames, "snapshot_at": a.snapshot_at,
           "tail_frames": done.frames, "jpeg_px": a.size, "live_ingest_s": round(live_s, 2),
           "snapshot": snap, "incremental_every": a.incremental, "deltas": deltas,
           "deltas_used": plan.deltas, "log_bytes_whole": log_bytes, "log_bytes_compacted": compact_bytes,
           "records_dropped": dropped, "compact_s": round(compact_s, 3),
           "rebuild_full_s": round(full_s, 2), "rebuild_snapshot_s": round(snap_s, 2),
           "rebuild_snapshot_parts_s": {"read_plan": round(t1 - start, 3), "import": round(t2 - t1, 3),
                                        "tail_replay": round(snap_s - (t2 - start), 3)},
           "rebuilt_equal_live": same, "want": want, "full": full, "got": got,
           # replay regroups frames (--replay-batch per call, live used --batch): on long streams
           # that may change clustering and so a greedy answer; snapshot + tail regroups only the tail
           "answer_equal_live": {"full": full_answer == want_answer, "snapshot": got_answer == want_answer},
           "answer_snapshot_equal_full": got_answer == full_answer}
    report.show_json(a.out, "snapshot_recovery", out)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
