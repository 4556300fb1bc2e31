#!/usr/bin/env bash
# rezende2015_planar: 'bash experiments/rezende2015_planar/run.sh' runs the full-budget sweep (sweep.toml; meant for a
# GPU machine, one process per GPU -- set JOBS/CUDA_VISIBLE_DEVICES to spread points) and
# reports to results/rezende2015_planar_full/. 'bash experiments/rezende2015_planar/run.sh reduced' runs the
# reduced CPU sweep (reduced.toml) behind results/rezende2015_planar/. See README.md.
# The paper's table reports bounds, so the report's first column (and the figures' metric)
# is the test ELBO; the k = 5000 NLL follows it. Rows are grouped by flow and length only:
# the NICE rows' coupling options would otherwise become columns of their own.
set -euo pipefail
here="$(dirname "$0")"
exec bash "$here/../_run_sweep.sh" rezende2015_planar "${1:-full}" \
  "experiments/rezende2015_planar/sweep.toml" "experiments/rezende2015_planar/reduced.toml" \
  --bound-reference "DLGM, diagonal (paper, secondary source): 89.9" \
  --bound-reference "DLGM + NF, K = 80 (paper, secondary source): 85.1" \
  --paired-against model.posterior.flow=none \
  --by model.posterior.flow model.posterior.num_layers \
  --metrics test/elbo_nats 'test/nll_iw\d+_nats' test/kl_nats test/recon_nats test/active_units
