#!/usr/bin/env bash
# burda2016_iwae: 'bash experiments/burda2016_iwae/run.sh' runs the full-budget sweep of the
# one-layer rows (sweep.toml; meant for a GPU machine, one process per GPU -- set
# JOBS/CUDA_VISIBLE_DEVICES to spread points) and reports to
# results/burda2016_iwae/one_layer_full/. 'run.sh reduced' runs the reduced CPU sweep
# (reduced.toml) behind results/burda2016_iwae/one_layer/.
# A second argument 'two_layer' does the same for the two-stochastic-layer rows
# (sweep_two_layer.toml / reduced_two_layer.toml -> results/burda2016_iwae/two_layer[_full]/).
# Reports pair every row with VAE k = 1, image by image (--paired-against). See README.md.
# 'run.sh long' runs issue 14's long rows (long.toml: VAE k = 1 and IWAE k = 5, 500
# epochs, two single-threaded processes, resumable) and reports to
# results/burda2016_iwae/long/: test-bound curves on a log-epoch axis with the paper's
# final NLLs as lines, and each curve's gain over its last doubling of steps.
set -euo pipefail
here="$(dirname "$0")"
if [ "${1:-full}" = long ]; then
  exec bash "$here/../_run_sweep.sh" burda2016_iwae/long reduced \
    "experiments/burda2016_iwae/long.toml" "experiments/burda2016_iwae/long.toml" \
    --paired-against train.objective=elbo train.k=1 --log-x \
    --reference "VAE k = 1 (paper Table 1): 86.76" --reference "IWAE k = 5 (paper Table 1): 85.54" \
    --metrics 'test/nll_iw\d+_nats' test/elbo_nats test/kl_nats test/active_units \
    test_curve/iwae_gain_last_doubling_nats curve/val_elbo_gain_last_doubling_nats
fi
case "${2:-one_layer}" in
  one_layer)
    exec bash "$here/../_run_sweep.sh" burda2016_iwae/one_layer "${1:-full}" \
      "experiments/burda2016_iwae/sweep.toml" "experiments/burda2016_iwae/reduced.toml" \
      --paired-against train.objective=elbo train.k=1 ;;
  two_layer)
    exec bash "$here/../_run_sweep.sh" burda2016_iwae/two_layer "${1:-full}" \
      "experiments/burda2016_iwae/sweep_two_layer.toml" \
      "experiments/burda2016_iwae/reduced_two_layer.toml" \
      --paired-against train.objective=elbo train.k=1 ;;
  *) echo "usage: run.sh [full|reduced|long] [one_layer|two_layer]  (got '$2')" >&2; exit 2 ;;
esac
