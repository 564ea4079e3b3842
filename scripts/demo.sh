#!/usr/bin/env bash
# The embedded demo: progressive learning with adaptive regularization on Fashion-MNIST, offline.
# Installs what is missing (Debian's dataset-fashion-mnist, .venv with the package), builds the TFDS
# dataset from the Debian files, prints the stage table, trains, and prints the final summary.
# Extra arguments go to effnetv2_jax.main (e.g. --config.num_epochs=2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q && $sudo apt-get install -y -q dataset-fashion-mnist
fi
source scripts/setup_env.sh
workdir=${WORKDIR:-workdirs/demo}
.venv/bin/python -m effnetv2_jax.data.prepare fashion_mnist
.venv/bin/python -m effnetv2_jax.main --config=configs/demo.py --workdir="$workdir" --mode=plan "$@"
.venv/bin/python -m effnetv2_jax.main --config=configs/demo.py --workdir="$workdir" "$@"
