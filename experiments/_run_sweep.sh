#!/usr/bin/env bash
# Shared by experiments/*/run.sh: run one experiment's sweep and write its report.
#   _run_sweep.sh RESULTS_NAME MODE SWEEP_FULL SWEEP_REDUCED [REPORT_ARGS...]
# MODE "full": the paper-budget sweep (meant for a GPU machine); the report goes to
# results/<name>_full/. MODE "reduced": the CPU sweep behind the committed results/<name>/
# (two single-threaded runs at a time on a 2-core machine). REPORT_ARGS go to `vaeflow
# report` (e.g. --metrics test/elbo_nats ... for a paper whose table reports bounds).
# Environment: JOBS (concurrent runs; default 1 full, 2 reduced), THREADS (torch CPU
# threads per run; default 1 reduced), VAEFLOW (the CLI; default .venv/bin/vaeflow when
# this checkout has one, else vaeflow on PATH), PYTHON (the interpreter that has vaeflow;
# default .venv/bin/python or python3), VAEFLOW_DATA (dataset root), SWEEP_ARGS (more
# `vaeflow sweep` arguments, split on spaces: e.g. "--executor submitit-slurm --cluster
# partition=gpu" runs the points as Slurm jobs, with JOBS=1 in reduced mode; README
# "Sweeps on a Slurm cluster").
# The report is written even when some points failed; the exit status is the sweep's.
set -euo pipefail
resolve() {  # a user-given relative program path, made absolute before the cd below
  case "$1" in */*) echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" ;; *) echo "$1" ;; esac
}
[ -n "${VAEFLOW:-}" ] && VAEFLOW="$(resolve "$VAEFLOW")"
[ -n "${PYTHON:-}" ] && PYTHON="$(resolve "$PYTHON")"
cd "$(dirname "$0")/.."
name="$1"; mode="$2"; full_sweep="$3"; reduced_sweep="$4"; shift 4
report_args=("$@")
if [ -z "${VAEFLOW:-}" ]; then
  if [ -x .venv/bin/vaeflow ]; then VAEFLOW=.venv/bin/vaeflow; else VAEFLOW=vaeflow; fi
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${VAEFLOW_DATA:-}" ] && [ -d ../shared/datasets ]; then
  export VAEFLOW_DATA="$(cd ../shared/datasets && pwd)"
fi
threads=()
case "$mode" in
  full) jobs="${JOBS:-1}"; sweep="$full_sweep"; out="results/${name}_full"
    if [ -n "${THREADS:-}" ]; then threads=(--threads "$THREADS"); fi ;;
  reduced) jobs="${JOBS:-2}"; sweep="$reduced_sweep"; out="results/${name}"
    threads=(--threads "${THREADS:-1}"); export OMP_NUM_THREADS="${THREADS:-1}" ;;
  *) echo "usage: run.sh [full|reduced]  (got '$mode')" >&2; exit 2 ;;
esac
rc=0
read -r -a sweep_args <<< "${SWEEP_ARGS:-}"
"$VAEFLOW" sweep "$sweep" --jobs "$jobs" ${threads[@]+"${threads[@]}"} \
  ${sweep_args[@]+"${sweep_args[@]}"} || rc=$?
# The runs live in the sweep's directory (<root>/<name>, root inherited through extends).
dir=$("$PYTHON" -c 'import sys; from vaeflow.tools.sweep import load_sweep; print(load_sweep(sys.argv[1]).directory)' "$sweep")
"$VAEFLOW" report "$dir" -o "$out" ${report_args[@]+"${report_args[@]}"} || rc=$?
echo "report: $out/ (sweep exit status $rc)"
exit "$rc"
