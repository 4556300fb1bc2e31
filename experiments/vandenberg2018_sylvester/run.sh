#!/usr/bin/env bash
# vandenberg2018_sylvester: 'bash experiments/vandenberg2018_sylvester/run.sh' runs the full-budget sweep (sweep.toml; meant for a
# GPU machine, one process per GPU -- set JOBS/CUDA_VISIBLE_DEVICES to spread points) and
# reports to results/vandenberg2018_sylvester_full/. 'bash experiments/vandenberg2018_sylvester/run.sh reduced' runs the
# reduced CPU sweep (reduced.toml) behind results/vandenberg2018_sylvester/. See README.md.
set -euo pipefail
here="$(dirname "$0")"
exec bash "$here/../_run_sweep.sh" vandenberg2018_sylvester "${1:-full}" \
  "experiments/vandenberg2018_sylvester/sweep.toml" "experiments/vandenberg2018_sylvester/reduced.toml"
