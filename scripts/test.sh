#!/usr/bin/env bash
# Set up (./.venv) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh vision,dev
.venv/bin/python -m ruff check graphprune tests benchmarks examples
export OMP_NUM_THREADS=1  # one thread per xdist worker (see tests/conftest.py)
exec .venv/bin/python -m pytest -n 2 -q "$@"
