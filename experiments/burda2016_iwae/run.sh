#!/usr/bin/env bash
# burda2016_iwae: 'bash experiments/burda2016_iwae/run.sh' runs the full-budget sweep (sweep.toml; meant for a
# GPU machine, one process per GPU -- set JOBS/CUDA_VISIBLE_DEVICES to spread points) and
# reports to results/burda2016_iwae_full/. 'bash experiments/burda2016_iwae/run.sh reduced' runs the
# reduced CPU sweep (reduced.toml) behind results/burda2016_iwae/. See README.md.
set -euo pipefail
here="$(dirname "$0")"
exec bash "$here/../_run_sweep.sh" burda2016_iwae "${1:-full}" \
  "experiments/burda2016_iwae/sweep.toml" "experiments/burda2016_iwae/reduced.toml"
