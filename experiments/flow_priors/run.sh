#!/usr/bin/env bash
# flow_priors: 'bash experiments/flow_priors/run.sh' runs the full-budget sweep (sweep.toml; meant for a
# GPU machine, one process per GPU -- set JOBS/CUDA_VISIBLE_DEVICES to spread points) and
# reports to results/flow_priors/vampprior_protocol_full/. 'bash experiments/flow_priors/run.sh
# reduced' runs the reduced CPU sweep (reduced.toml: vaeflow's head, init and fused
# AdamNormGrad) behind results/flow_priors/vampprior_protocol/.
# 'run.sh code' runs the same grid on config.toml's (the authors' code's) settings
# (reduced_code.toml) and grows results/flow_priors/vampprior_protocol/code_settings/: the
# points that table already holds are skipped (--skip-reported, so a new machine trains
# only what is missing), its stored rows are reported again beside the new runs
# (--from-report) with their per-image scores (--keep-scores), and every row is paired
# with the VampPrior (the paper's row) image by image. See README.md.
set -euo pipefail
here="$(dirname "$0")"
reference="VAE + VampPrior, K = 500 (paper, secondary source): 85.57"
if [ "${1:-full}" = code ]; then
  table=results/flow_priors/vampprior_protocol/code_settings
  stored=()
  if [ -f "$here/../../$table/results.json" ]; then
    SWEEP_ARGS="${SWEEP_ARGS:-} --skip-reported $table/results.json"
    stored=(--from-report "$table/results.json")
  fi
  export SWEEP_ARGS
  # The sweep folder also holds code_exact*.toml's runs (vaeflow's settings but one):
  # the table takes the runs on all three of the code's settings.
  exec bash "$here/../_run_sweep.sh" flow_priors/vampprior_protocol/code_settings reduced \
    "experiments/flow_priors/sweep.toml" "experiments/flow_priors/reduced_code.toml" \
    --reference "$reference" ${stored[@]+"${stored[@]}"} --keep-scores \
    --where model.init=he_normal model.posterior.scale=log_var_hardtanh \
    train.normgrad_split=true \
    --paired-against model.prior.name=vamp
fi
exec bash "$here/../_run_sweep.sh" flow_priors/vampprior_protocol "${1:-full}" \
  "experiments/flow_priors/sweep.toml" "experiments/flow_priors/reduced.toml" \
  --reference "$reference"
