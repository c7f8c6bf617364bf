"""Needle test: exact-match accuracy of full | frame | token | cluster on a long real-video stream (issue 4).

    python scaling_bench/needle.py --model dino-smollm2 --out docs/results
    python scaling_bench/needle.py --model tiny --quick --out /tmp/needle

Writes needle.json, needle.png and needle.md under --out and prints the table. The logic (and the
method, in its docstring) lives in `scaling_bench.harness.needle`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from scaling_bench.harness.needle import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
