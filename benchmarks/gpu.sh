#!/usr/bin/env bash
# GPU throughput of the paper's CIFAR-10 UNet (35.7M) with this project's library, in one run of <= 8 minutes on one
# GPU: bf16 training images/s (batch 128 and the largest that fits), 1000-step and DDIM-50 sampling images/s, FID
# feature-extraction images/s, each as a fraction of the bf16 matmul roof measured in the same run, and of the chip's
# datasheet dense bf16 figure (recorded separately). Random weights, synthetic data: nothing is downloaded.
# Results: $OUT/gpu_results.json (or benchmarks/results/), one JSON line per measurement.
#
#   bash benchmarks/gpu.sh                          # any machine with CUDA, torch and this checkout
#   DATASHEET_TFLOPS=989.5 bash benchmarks/gpu.sh   # a chip benchmarks/reference.py does not know: its dense bf16
#
# Needs only torch (and torch-fidelity for the FID row); a wheel folder .whl/ beside the checkout is installed into
# /tmp/site first when torch-fidelity is missing (the offline GPU machines of this project's sessions).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
. benchmarks/offline_wheels.sh
offline_wheels "import torch_fidelity"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
export PYTHONUNBUFFERED=1
exec timeout "${GPU_BENCH_TIMEOUT:-480}" "$PY" benchmarks/gpu_bench.py --out "${OUT:-benchmarks/results}" \
    --budget-s "${GPU_BENCH_BUDGET:-400}" ${DATASHEET_TFLOPS:+--datasheet-tflops "$DATASHEET_TFLOPS"} "$@"
