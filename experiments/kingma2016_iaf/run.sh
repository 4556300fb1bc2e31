#!/usr/bin/env bash
# kingma2016_iaf: 'bash experiments/kingma2016_iaf/run.sh' runs the full-budget MNIST and
# CIFAR-10 sweeps (sweep_mnist.toml, sweep_cifar10.toml, and the top-down ResNet VAE's
# sweep_topdown_cifar10.toml; meant for a GPU machine) and reports to
# results/kingma2016_iaf/{mnist,cifar10,topdown_cifar10}_full/. 'bash
# experiments/kingma2016_iaf/run.sh reduced' runs the reduced CPU sweeps behind
# results/kingma2016_iaf/{mnist,cifar10}/. See README.md. CIFAR-10 runs even if an MNIST
# point failed; the exit status is non-zero if any point failed.
set -uo pipefail
here="$(dirname "$0")"
mode="${1:-full}"
rc=0
bash "$here/../_run_sweep.sh" kingma2016_iaf/mnist "$mode" \
  experiments/kingma2016_iaf/sweep_mnist.toml experiments/kingma2016_iaf/reduced_mnist.toml || rc=$?
bash "$here/../_run_sweep.sh" kingma2016_iaf/cifar10 "$mode" \
  experiments/kingma2016_iaf/sweep_cifar10.toml experiments/kingma2016_iaf/reduced_cifar10.toml || rc=$?
bash "$here/../_run_sweep.sh" kingma2016_iaf/topdown_cifar10 "$mode" \
  experiments/kingma2016_iaf/sweep_topdown_cifar10.toml \
  experiments/kingma2016_iaf/reduced_topdown_cifar10.toml || rc=$?
exit "$rc"
