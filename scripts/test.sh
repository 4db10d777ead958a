#!/usr/bin/env bash
# The README's test command: install (CPU torch first, then memscan with test extras) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pytest -q "$@"
