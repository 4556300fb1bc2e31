#!/usr/bin/env bash
# vandenberg2018_sylvester: 'bash experiments/vandenberg2018_sylvester/run.sh' runs the full-budget sweep (sweep.toml; meant for a
# GPU machine, one process per GPU -- set JOBS/CUDA_VISIBLE_DEVICES to spread points) and
# reports to results/vandenberg2018_sylvester/static_mnist_full/. 'bash
# experiments/vandenberg2018_sylvester/run.sh reduced' runs the reduced CPU sweep
# (reduced.toml) behind results/vandenberg2018_sylvester/static_mnist/. See README.md.
# The -ELBO is the number the readable sources quote for the paper, so the report's first
# column (and the figures' metric) is the test ELBO; the k = 5000 NLL follows it. One row
# per posterior flow (each row's flow options would otherwise become columns).
#
# 'run.sh long' runs issue 14's long rows (long.toml: no flow and O-SNF, 50 epochs) in
# steps that each leave a result and resume where a killed session left them: both rows
# trained at once without evaluation (--resume auto), then each evaluated with k = 5000 on
# the fixed random 1,000 test images (~1 h per row on a CPU core), then grown to all
# 10,000 (`vaeflow eval` scores only the other 9,000; ~9 h per row on a CPU core), then
# the report -> results/vandenberg2018_sylvester/long/ (log-epoch curves with the paper's
# -ELBO as lines, each curve's gain over its last doubling of steps). Run it again after
# an interruption: finished steps are skipped. THREADS (default 1) per process; LONG_SWEEP
# and LONG_OUT replace the sweep file and the report folder (tests run a tiny sweep).
set -euo pipefail
here="$(dirname "$0")"
report_args=(
  --bound-reference "no flow (paper, via FFJORD Table 3): 86.55"
  --bound-reference "best Sylvester flow (paper, via FFJORD Table 3): 83.32"
  --paired-against model.posterior.flow=none
  --by model.posterior.flow
)
metrics=(test/elbo_nats 'test/nll_iw\d+_nats' test/kl_nats test/recon_nats test/active_units)
if [ "${1:-full}" != long ]; then
  exec bash "$here/../_run_sweep.sh" vandenberg2018_sylvester/static_mnist "${1:-full}" \
    "experiments/vandenberg2018_sylvester/sweep.toml" "experiments/vandenberg2018_sylvester/reduced.toml" \
    "${report_args[@]}" --metrics "${metrics[@]}"
fi
cd "$here/../.."
if [ -z "${VAEFLOW:-}" ]; then
  if [ -x .venv/bin/vaeflow ]; then VAEFLOW="$PWD/.venv/bin/vaeflow"; else VAEFLOW=vaeflow; fi
fi
if [ -z "${VAEFLOW_DATA:-}" ] && [ -d ../shared/datasets ]; then
  export VAEFLOW_DATA="$(cd ../shared/datasets && pwd)"
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python3; fi
fi
threads="${THREADS:-1}"
export OMP_NUM_THREADS="$threads" VAEFLOW
sweep="${LONG_SWEEP:-experiments/vandenberg2018_sylvester/long.toml}"
out="${LONG_OUT:-results/vandenberg2018_sylvester/long}"
cmds="$(mktemp)"
trap 'rm -f "$cmds"' EXIT
"$VAEFLOW" sweep "$sweep" --commands-file "$cmds"
rc=0
# 1. Training, both rows at once (one line per row: `vaeflow train ... --run-dir DIR`). A
# row that fails (diverges, say) does not stop the other's evaluation and the report.
sed -e "s|^vaeflow |\"\$VAEFLOW\" |" -e "s|\$| --no-eval --resume auto --threads $threads|" "$cmds" \
  | xargs -d '\n' -P 2 -I{} bash -c '{}' || rc=$?
# Every point's run directory (the commands file lists only the points still to train).
mapfile -t runs < <("$PYTHON" -c 'import sys; from vaeflow.tools.sweep import expand
for p in expand(sys.argv[1], validate=False): print(p.run_dir)' "$sweep")
# 2. and 3. The fixed random 1,000 test images, then all 10,000 (each resumable from its
# partial file). A step whose result is in summary.json already is skipped: `vaeflow
# eval` of images it has scored scores them again.
scored() {  # test images the run's summary.json covers (0: not evaluated)
  "$PYTHON" -c 'import json, sys
try: print(json.load(open(sys.argv[1] + "/summary.json")).get("test/n_examples", 0))
except OSError: print(0)' "$1"
}
trained() {  # the run finished training: completed, or stopped early (train_summary.json)
  "$PYTHON" -c 'import json, sys
try: s = json.load(open(sys.argv[1] + "/train_summary.json"))["status"]
except (OSError, KeyError, ValueError): s = ""
print(s == "completed" or s.startswith("early stopping"))' "$1"
}
for n in 1000 10000; do
  for run in "${runs[@]}"; do
    if [ "$(trained "$run")" = True ] && [ "$(scored "$run")" -lt "$n" ]; then
      "$VAEFLOW" eval "$run" --n-test "$n" --threads "$threads" || rc=$?
    fi
  done
done
# The report of whatever was evaluated (a row without summary.json is listed as such).
"$VAEFLOW" report "${runs[@]}" -o "$out" --log-x \
  "${report_args[@]}" --metrics "${metrics[@]}" \
  test_curve/iwae_gain_last_doubling_nats curve/val_elbo_gain_last_doubling_nats || rc=$?
exit "$rc"
