#!/usr/bin/env bash
# vandenberg2018_sylvester: 'bash experiments/vandenberg2018_sylvester/run.sh' runs the full-budget sweep (sweep.toml; meant for a
# GPU machine, one process per GPU -- set JOBS/CUDA_VISIBLE_DEVICES to spread points) and
# reports to results/vandenberg2018_sylvester/static_mnist_full/. 'bash
# experiments/vandenberg2018_sylvester/run.sh reduced' runs the reduced CPU sweep
# (reduced.toml) behind results/vandenberg2018_sylvester/static_mnist/. See README.md.
# The -ELBO is the number the readable sources quote for the paper, so the report's first
# column (and the figures' metric) is the test ELBO; the k = 5000 NLL follows it. One row
# per posterior flow (each row's flow options would otherwise become columns).
set -euo pipefail
here="$(dirname "$0")"
exec bash "$here/../_run_sweep.sh" vandenberg2018_sylvester/static_mnist "${1:-full}" \
  "experiments/vandenberg2018_sylvester/sweep.toml" "experiments/vandenberg2018_sylvester/reduced.toml" \
  --bound-reference "no flow (paper, via FFJORD Table 3): 86.55" \
  --bound-reference "best Sylvester flow (paper, via FFJORD Table 3): 83.32" \
  --paired-against model.posterior.flow=none \
  --by model.posterior.flow \
  --metrics test/elbo_nats 'test/nll_iw\d+_nats' test/kl_nats test/recon_nats test/active_units
