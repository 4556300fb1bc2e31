#!/usr/bin/env bash
# One-shot GPU session for benchmarks/README.md's CUDA tables (run through the device tool):
#   bash benchmarks/gpu_run.sh OUT_DIR [PART ...]
# PARTs (default: all, in this order): flows nll train compile_step stack epoch. One device call
# may run at most 10 minutes and a session has 15 minutes of device time in all, so run the
# parts a session needs (their time limits below add up to ~25 minutes).
# Expects the zuko/nflows packages in .gpuwheels/site (carried: the GPU machine has no
# package index). Each part has its own time limit and writes its table to OUT_DIR as soon
# as it finishes. CUDA correctness checks (bf16, RNG state, training on MNIST from
# .gpudata/MNIST/raw) are a separate script: python3 benchmarks/gpu_check.py --out OUT_DIR.
set -uo pipefail
out="${1:?usage: gpu_run.sh OUT_DIR [flows|nll|train|compile_step|stack|epoch ...]}"
shift
parts=" ${*:-flows nll train compile_step stack epoch} "
want() { [[ "$parts" == *" $1 "* ]]; }
mkdir -p "$out" && : >> "$out/stderr.txt"
export PYTHONPATH="$PWD:$PWD/benchmarks:$PWD/.gpuwheels/site" VAEFLOW_DATA="$PWD/.gpudata"
export PYTHONUNBUFFERED=1 KINETO_LOG_LEVEL=5 MPLBACKEND=Agg
# The device tool copies the working tree but not always a current .git: pass the commit.
echo "${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}" > "$out/commit.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/machine.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/machine.txt"
want flows && timeout 200 python3 benchmarks/flows.py --device cuda --repeats 30 --warmup 5 2>>"$out/stderr.txt" | tee "$out/flows_cuda.md"
want nll && timeout 240 python3 benchmarks/nll_eval.py --device cuda --images 200 --batch 20 100 --chunk 1000 5000 --repeats 3 --modes eager compile 2>>"$out/stderr.txt" | tee "$out/nll_eval_cuda.md"
want train && timeout 60 python3 benchmarks/train_step.py --device cuda --repeats 30 --warmup 5 2>>"$out/stderr.txt" | tee "$out/train_step_cuda.md"
want train && timeout 150 python3 benchmarks/train_step.py --device cuda --compile --models quickstart sylvester_iaf --repeats 30 --warmup 5 2>>"$out/stderr.txt" | tee "$out/train_step_compile_cuda.md"
# train.compile_step (one CUDA graph per step) next to eager and the compiled model, interleaved.
want compile_step && timeout 240 python3 benchmarks/train_step.py --device cuda --compile --compile-step --interleave --models quickstart sylvester_iaf --repeats 30 --warmup 5 2>>"$out/stderr.txt" | tee "$out/train_step_compile_step_cuda.md"
# Stacked runs (issue 14: >= 10x for 16 stacked Burda-size runs on a GPU), then the gated-conv model.
want stack && timeout 400 python3 benchmarks/stack.py --device cuda --sizes 1 4 16 --steps 100 --repeats 3 2>>"$out/stderr.txt" | tee "$out/stack_cuda.md"
want stack && timeout 240 python3 benchmarks/stack.py --device cuda --model sylvester --sizes 1 4 16 --steps 10 --repeats 3 --variants sequential stacked_before stacked 2>>"$out/stderr.txt" | tee "$out/stack_sylvester_cuda.md"
# The cost of a reproduction on this GPU (issue 14: a Burda 1-layer epoch in <= 1 s with
# graphs; the 3280-epoch row in under an hour): every paper row eager, then the Burda rows
# with the compiled update (one CUDA graph per step), and its training loop.
want epoch && timeout 300 python3 benchmarks/epoch.py --device cuda --repeats 20 --warmup 5 2>>"$out/stderr.txt" | tee "$out/epoch_cuda.md"
want epoch && timeout 200 python3 benchmarks/epoch.py --device cuda --compile-step --rows burda2016_iwae/vae_k1 burda2016_iwae/iwae_k5 burda2016_iwae/iwae_k50 --repeats 50 --warmup 10 2>>"$out/stderr.txt" | tee "$out/epoch_compile_step_cuda.md"
tail -5 "$out/stderr.txt"
