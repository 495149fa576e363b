#!/usr/bin/env bash
# Issue 15's GPU benchmark, for an NVIDIA machine without network (the device tool's): the serving
# engine on a 1.1B Llama-shaped model with random weights, bf16, 1 / 64 / 512 LoRA adapters
# (bench/serve/gpu_engine.py). Under 8 minutes on an H100/H200; the table goes to $OUT (the device
# tool's folder), else bench/results/gpu_serve_<device>.md. Uses the PyTorch fallback ops if the
# extension is not built (bench/gpu_check.sh builds it first).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu_serve_device.txt"
PYTHONUNBUFFERED=1 timeout "${SERVE_SECONDS:-460}" "${PYTHON:-python3}" -m bench.serve.gpu_engine --out "$out" "$@"
