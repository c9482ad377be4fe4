#!/usr/bin/env bash
# Set up (./.venv) and run the main job on the built-in default: prune
# torchvision ResNet-50 to 50% of its channels, verify with the oracle and
# write the slim model to out/resnet50-slim.pt. Extra arguments go to
# `graphprune prune` (e.g. --model torchvision:mobilenet_v2 --ratio 0.3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh vision
mkdir -p out
exec .venv/bin/graphprune prune --out out/slim.pt "$@"
