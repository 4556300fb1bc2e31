#!/usr/bin/env bash
# flow_priors: 'bash experiments/flow_priors/run.sh' runs the full-budget sweep (sweep.toml; meant for a
# GPU machine, one process per GPU -- set JOBS/CUDA_VISIBLE_DEVICES to spread points) and
# reports to results/flow_priors/vampprior_protocol_full/. 'bash experiments/flow_priors/run.sh
# reduced' runs the reduced CPU sweep (reduced.toml) behind
# results/flow_priors/vampprior_protocol/. See README.md.
set -euo pipefail
here="$(dirname "$0")"
exec bash "$here/../_run_sweep.sh" flow_priors/vampprior_protocol "${1:-full}" \
  "experiments/flow_priors/sweep.toml" "experiments/flow_priors/reduced.toml" \
  --reference "VAE + VampPrior, K = 500 (paper, secondary source): 85.57"
