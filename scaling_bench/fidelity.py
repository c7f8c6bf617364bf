"""Retrieval fidelity of full | frame | token | cluster on real video (issue 3, item 5).

    python scaling_bench/fidelity.py --model both --budgets 0.05,0.1,0.2 --out docs/results
    mosaic-ray bench fidelity --quick --model tiny --out /tmp/fidelity

Writes fidelity.json, fidelity.png and fidelity.md under --out and prints a short table. The logic
(and the method, in its docstring) lives in `mosaic_ray.bench.fidelity`.
"""

import sys

from mosaic_ray.bench.fidelity import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
