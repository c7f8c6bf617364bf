"""Needle test: exact-match accuracy of full | frame | token | cluster on a long real-video stream (issue 4).

    python scaling_bench/needle.py --model dino-smollm2 --out docs/results
    python scaling_bench/needle.py --model tiny --quick --out /tmp/needle

Writes needle.json, needle.png and needle.md under --out and prints the table. The logic (and the
method, in its docstring) lives in `mosaic_ray.bench.needle`.
"""

import sys

from mosaic_ray.bench.needle import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
