"""Does what one question attends stay hot for the next? (issue 19 item 4)

    python scaling_bench/attention_persistence.py --out docs/results

The logic (and the method, in its docstring) lives in `mosaic_ray.bench.attention_persistence`.
"""

import sys

from mosaic_ray.bench.attention_persistence import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
