"""Retrieval fidelity of full | frame | token | cluster on real video (issue 3, item 5).

    python scaling_bench/fidelity.py --model both --budgets 0.05,0.1,0.2 --out docs/results
    python scaling_bench/fidelity.py --quick --model tiny --out /tmp/fidelity

Writes fidelity.json, fidelity.png and fidelity.md under --out and prints a short table. The logic
(and the method, in its docstring) lives in `scaling_bench.harness.fidelity`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from scaling_bench.harness.fidelity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
