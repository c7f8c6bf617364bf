"""Needle suite: the needle test over four real-video streams (two clips x two lengths, 48 questions
of six kinds), pooled with confidence intervals, full and the oracles beside every method.

    python scaling_bench/needle_suite.py --budgets 0.05,0.1,0.2 --out docs/results
    python scaling_bench/needle_suite.py --budgets 0.05,0.1,0.2 --independent --out docs/results
    python scaling_bench/needle_suite.py --quick --out /tmp/suite

Unknown arguments go to each stream's needle test (scaling_bench/needle.py). Writes
needle_suite[_independent].{json,md,png} and each stream's needle files under needle_suite/<name>/.
The logic lives in `mosaic_ray.bench.needle_suite`.
"""

import sys

from mosaic_ray.bench.needle_suite import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
