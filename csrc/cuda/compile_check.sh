#!/usr/bin/env bash
# Compile-checks the CUDA kernels without a GPU (called by `make test`):
#  1. lora_kernels.cuh through compile_check.cu, every kernel for every dtype, for sm_80 and
#     sm_90, with torch's nvcc defines; warnings (register spills included) are errors.
#  2. lora_cuda.cu (the ATen launchers) against the torch headers of $PYTHON (default: the
#     repo's .venv, else python3), when that torch ships its c10/cuda headers (CPU wheels do,
#     less one CMake-generated header that is stubbed here). Compile only, nothing is linked.
# Exits non-zero on any failure; skips (exit 0) only when nvcc itself is missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "compile_check: nvcc not found, CUDA kernels NOT compile-checked" >&2
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

flags=(-std=c++17 -O3 --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
sm80=(-gencode arch=compute_80,code=sm_80)
sm90=(-gencode arch=compute_90,code=sm_90)

echo "compile_check: $("$NVCC" --version | tail -1)"
if ! "$NVCC" "${flags[@]}" "${sm80[@]}" "${sm90[@]}" -Xptxas -warn-spills,-warn-lmem-usage --Werror all-warnings \
  --resource-usage -I "$root/csrc" -c "$here/compile_check.cu" -o "$tmp/kernels.o" >"$tmp/kernels.log" 2>&1; then
  grep -v '^ptxas info *: Compiling entry' "$tmp/kernels.log" >&2
  echo "compile_check: lora_kernels.cuh FAILED" >&2
  exit 1
fi
kernels=$(grep -c 'Function properties' "$tmp/kernels.log")
max_regs=$(grep -o 'Used [0-9]* registers' "$tmp/kernels.log" | awk '{print $2}' | sort -n | tail -1)
echo "compile_check: lora_kernels.cuh OK ($kernels kernels: sm_80, sm_90 x fp16, bf16, fp32, fp64; no spills; <= $max_regs registers)"

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
includes="$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null || true)"
if [[ -z "$includes" ]]; then
  echo "compile_check: no torch in $PYTHON, lora_cuda.cu NOT compile-checked"
  exit 0
fi
torch_include="${includes%% *}"
if [[ ! -f "$torch_include/c10/cuda/CUDAGuard.h" ]]; then
  echo "compile_check: this torch has no c10/cuda headers, lora_cuda.cu NOT compile-checked"
  exit 0
fi
inc_flags=()
for dir in $includes; do inc_flags+=(-isystem "$dir"); done
# CPU wheels ship c10/cuda but not the header CMake generates for it; its CUDA-build content:
if [[ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$tmp/include/c10/cuda/impl"
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$tmp/include/c10/cuda/impl/cuda_cmake_macros.h"
  inc_flags+=(-isystem "$tmp/include")
fi
# The kernels were checked for both targets above; the launchers once, for sm_90.
"$NVCC" "${flags[@]}" "${sm90[@]}" -Xcompiler -fPIC "${inc_flags[@]}" -I "$root/csrc" -DTORCH_EXTENSION_NAME=_C \
  -c "$here/lora_cuda.cu" -o "$tmp/lora_cuda.o"
echo "compile_check: lora_cuda.cu OK against torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
