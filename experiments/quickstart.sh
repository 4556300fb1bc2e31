#!/usr/bin/env bash
# README command 1: install vaeflow into ./.venv and run the main job.
# Until the VAE training loop lands (issue 4), the main job is a short toy 2-D fit:
# RealNVP, MAF, NSF, residual and FFJORD on two moons, ~2 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[dev]"
export MPLBACKEND=Agg
.venv/bin/python experiments/toy2d/run.py --config experiments/toy2d/config.toml \
  --datasets two_moons --steps "${STEPS:-500}" --out runs/quickstart "$@"
echo
cat runs/quickstart/results.md
echo "plots: runs/quickstart/density.png runs/quickstart/samples.png"
