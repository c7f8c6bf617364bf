"""Needle suite: the needle test over four real-video streams (two clips x two lengths, 48 questions
of six kinds), pooled with confidence intervals, full and the oracles beside every method.

    python scaling_bench/needle_suite.py --budgets 0.05,0.1,0.2 --out docs/results
    python scaling_bench/needle_suite.py --budgets 0.05,0.1,0.2 --independent --out docs/results
    python scaling_bench/needle_suite.py --quick --out /tmp/suite

Unknown arguments go to each stream's needle test (scaling_bench/needle.py). Writes
needle_suite[_independent].{json,md,png} and each stream's needle files under needle_suite/<name>/.
The logic lives in `scaling_bench.harness.needle_suite`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from scaling_bench.harness.needle_suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
