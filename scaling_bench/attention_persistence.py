"""Does what one question attends stay hot for the next? (issue 19 item 4)

    python scaling_bench/attention_persistence.py --out docs/results

The logic (and the method, in its docstring) lives in `scaling_bench.harness.attention_persistence`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from scaling_bench.harness.attention_persistence import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
