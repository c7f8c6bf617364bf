"""Redundant-frame pruning on real video: share pruned, encoder time saved, needle accuracy with
and without pruning, per clip (issue 10).

    python scaling_bench/pruning.py --out docs/results                     # dino-smollm2, every clip found
    python scaling_bench/pruning.py --quick --videos bikes --out /tmp/pr   # tiny model (tests)

Writes pruning.json, pruning.md and pruning.png under --out and prints the table. The method is in
the docstring of `scaling_bench.harness.pruning`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from scaling_bench.harness.pruning import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
