#!/usr/bin/env bash
# Set up ktl on a Debian/Ubuntu machine: Fashion-MNIST from apt, PyTorch, then ktl itself.
# Run as root (or with sudo available). Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
if command -v apt-get >/dev/null && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
PY="${PYTHON:-python3}"
# torch first, with pip (the versions the project is tested with)
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
# animal-mnist declares tensorflow but ktl reads its data files directly
"$PY" -m pip install -q --no-deps animal-mnist==0.4
# flower: the Flower adapter's tests run in CI (flwr pins Ray and moves rich/typer down a minor)
"$PY" -m pip install -q -e ".[dev,flower]"
echo "ktl is installed: try 'ktl run' or 'python -m pytest'"
