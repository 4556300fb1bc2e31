#!/usr/bin/env bash
# README command 1: install vaeflow into ./.venv and run the main job, a short real MNIST
# training run on CPU (IAF posterior + RealNVP prior; a few minutes on 2 cores) that ends
# with test numbers, sample grids and TensorBoard logs in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[dev]"
# Offline development machines keep the datasets beside the checkout.
if [ -z "${VAEFLOW_DATA:-}" ] && [ -d ../shared/datasets ]; then
  export VAEFLOW_DATA="$(cd ../shared/datasets && pwd)"
fi
RUN_DIR="${RUN_DIR:-runs/quickstart}"
# --resume auto: continue an interrupted run, start a new one otherwise (delete the folder
# to start afresh).
.venv/bin/vaeflow train experiments/quickstart/mnist_iaf_flowprior.toml \
  --run-dir "$RUN_DIR" --resume auto "$@"
echo "samples: $RUN_DIR/samples/"
