#!/usr/bin/env bash
# Create ./.venv (if needed) and install graphprune with the extras given as $1
# (default: vision,dev). Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-vision,dev}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[${extras}]"
