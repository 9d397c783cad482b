#!/usr/bin/env bash
# The pipeline's own stages on one GPU, in one run of <= 8 minutes: fetch (a CIFAR-10-format dataset written first in
# the official python-batch format), train under Ray Train (1 worker: NCCL, bf16, compiled; then 2 workers sharing the
# GPU over gloo, resuming the first run's checkpoint), sample over Ray actors (DDPM and SDE-DPM-Solver++(2M) at 20
# steps, bf16, compiled), evaluate (torch-fidelity's Inception-v3; random weights when the published file is absent,
# and labelled so), each through `python -m tasks.<stage>` as users run it; then benchmarks/gpu.sh at the same batches
# for side-by-side numbers. Nothing is downloaded. Per-stage images/s and start-up seconds (benchmarks/gpu_pipeline.py
# says how each is read): $OUT/gpu_pipeline.json (or benchmarks/results/), one JSON object.
#
#   bash benchmarks/gpu_pipeline.sh           # a machine with CUDA and this checkout
#   bash benchmarks/gpu_pipeline.sh --smoke   # the same stages on the CPU at a tiny size (well under 90 s)
#
# Needs the project's dependencies (pyproject.toml): the bundle .whl/ beside the checkout (benchmarks/device_packages.sh
# builds it) is installed into /tmp/site first when one of them is missing (this project's offline GPU machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
. benchmarks/offline_wheels.sh
offline_wheels "import ray, pydantic, diffusers, torch_fidelity"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
export PYTHONUNBUFFERED=1
exec timeout "${GPU_PIPELINE_TIMEOUT:-480}" "$PY" benchmarks/gpu_pipeline.py --out "${OUT:-benchmarks/results}" \
    --budget-s "${GPU_PIPELINE_BUDGET:-450}" "$@"
