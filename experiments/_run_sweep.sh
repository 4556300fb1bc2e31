#!/usr/bin/env bash
# Shared by experiments/*/run.sh: run one experiment's sweep(s) and its report.
#   _run_sweep.sh RESULTS_NAME MODE SWEEP_FULL SWEEP_REDUCED
# MODE "full": the paper-budget sweep (GPU; the report goes to results/<name>_full/, not
# committed until someone has run it). MODE "reduced": the CPU sweep whose results are
# committed in results/<name>/ (two single-threaded runs at a time on a 2-core machine).
# Environment: JOBS (concurrent runs; default 1 full, 2 reduced), THREADS (torch CPU
# threads per run; default 1 reduced), VAEFLOW (the CLI; default "vaeflow", or
# ".venv/bin/vaeflow" when this checkout has one), VAEFLOW_DATA (dataset root).
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1"; mode="$2"; full_sweep="$3"; reduced_sweep="$4"
if [ -z "${VAEFLOW:-}" ]; then
  if [ -x .venv/bin/vaeflow ]; then VAEFLOW=.venv/bin/vaeflow; else VAEFLOW=vaeflow; fi
fi
if [ -z "${VAEFLOW_DATA:-}" ] && [ -d ../shared/datasets ]; then
  export VAEFLOW_DATA="$(cd ../shared/datasets && pwd)"
fi
case "$mode" in
  full) jobs="${JOBS:-1}"; threads=(${THREADS:+--threads "$THREADS"}); out="results/${name}_full" ;;
  reduced) jobs="${JOBS:-2}"; threads=(--threads "${THREADS:-1}"); out="results/${name}"
    export OMP_NUM_THREADS="${THREADS:-1}" ;;
  *) echo "usage: run.sh [full|reduced]  (got '$mode')" >&2; exit 2 ;;
esac
sweep="$full_sweep"; [ "$mode" = reduced ] && sweep="$reduced_sweep"
"$VAEFLOW" sweep "$sweep" --jobs "$jobs" "${threads[@]}"
# The sweep's runs live in <root>/<name>/ (root "runs" in every experiment sweep).
sweep_name=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["name"])' "$sweep")
"$VAEFLOW" report "runs/$sweep_name" -o "$out"
echo "report: $out/"
