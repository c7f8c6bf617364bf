"""What a base snapshot costs in memory, streamed (issue 20) and as it was before, without Ray:
peak RSS (ru_maxrss) above its starting point while one snapshot of --mib MiB of tensors is

- write: encoded, written to a `DiskFrameLog` slot and verified (the RSS above the export's own
  tensors), as `StreamSnapshots` does;
- read: read back and decoded, as a rebuild's `plan_rebuild` does (1x is the decoded tensors).

"old" is the path before issue 20, rebuilt here: torch.save to bytes, the slot written from them,
read back whole and compared; read whole, decoded by torch.load. Each phase runs in a fresh
process (ru_maxrss is a high-water mark).

    python scaling_bench/snapshot_memory.py --mib 400
"""

from __future__ import annotations

import argparse
import io
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray



def _rss_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10


def phase(mode: str, which: str, root: str, mib: int) -> None:
    import torch

    from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog
    from mosaic_ray.runtime.durability.snapshot_codec import decode_part, encode_chunks
    from mosaic_ray.runtime.actors.snapshots import StreamSnapshots

    log = DiskFrameLog(root, "always")
    if which == "write":
        state = {"meta": {}, "tensors": {"pool.kv": torch.randn((mib << 20) // 4)}}
        start, t0 = _rss_mib(), time.perf_counter()
        if mode == "new":
            StreamSnapshots(log, 1, None, None, None, 1.0)._write_verified("s", 1, encode_chunks(state, 1, 1))
        else:
            out = io.BytesIO()
            torch.save({"format": 1, "mark": 1, "last_seq": 1, "meta": {}, "tensors": state["tensors"]}, out)
            blob = out.getvalue()
            log.put_snapshot("s", 1, blob)
            assert log.snapshot_path("s").read_bytes()[28:] == blob
    else:
        start, t0 = _rss_mib(), time.perf_counter()
        if mode == "new":
            decode_part(log.get_snapshot("s")[1])
        else:
            torch.load(io.BytesIO(log.snapshot_path("s").read_bytes()[28:]), weights_only=True)
    print(f"{mode:3} {which:5}: +{_rss_mib() - start:5d} MiB peak RSS, {time.perf_counter() - t0:.2f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=400, help="MiB of tensors in the snapshot")
    p.add_argument("--phase", nargs=3, metavar=("MODE", "WHICH", "ROOT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        phase(*a.phase, a.mib)
        return 0
    print(f"one snapshot of {a.mib} MiB of tensors")
    for mode in ("old", "new"):
        with tempfile.TemporaryDirectory() as root:
            for which in ("write", "read"):
                subprocess.run([sys.executable, __file__, "--mib", str(a.mib), "--phase", mode, which, root],
                               check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
