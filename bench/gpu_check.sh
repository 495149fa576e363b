#!/usr/bin/env bash
# The GPU check of issue 4, for an NVIDIA machine without network: build adapterhub._C with
# its CUDA kernels, run the `cuda` tests, run the GPU benchmark (on an H100: build 50 s,
# tests 45 s, benchmark 20 s).
# Logs and the benchmark table go to $OUT (the device tool's folder), else bench/results/.
# Exit status: non-zero if the build, a test or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
# The GPU machines preset CC/CXX to /opt/gcc, whose C++ runtime differs from the one torch loads:
# any C++ exception from the extension then crashes the process (seen: rc 139). Build with the
# system compiler (ADAPTERHUB_CXX / ADAPTERHUB_CC choose another).
if [[ -x /usr/bin/g++ ]]; then export CC="${ADAPTERHUB_CC:-/usr/bin/gcc}" CXX="${ADAPTERHUB_CXX:-/usr/bin/g++}"; fi
deadline=$((SECONDS + ${CHECK_SECONDS:-400}))
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' | tee -a "$out/gpu.txt"

# A stale build (this checkout's CPU build, another torch) must not be picked up.
rm -rf build adapterhub/_C*.so
build_jit() {  # fallback when setup.py cannot run (e.g. a setuptools too old for pyproject.toml)
  "$PY" - <<'EOF'
import glob, os, shutil
from torch.utils.cpp_extension import load
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")) + ["csrc/cuda/lora_cuda.cu"]
os.makedirs("build/jit", exist_ok=True)
define = "-DADAPTERHUB_WITH_CUDA=1"
module = load(name="_C", sources=sources, extra_include_paths=[os.path.abspath("csrc")], build_directory="build/jit",
              extra_cflags=["-O3", "-fopenmp", define], extra_ldflags=["-fopenmp"],
              extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", define])
shutil.copy(module.__file__, "adapterhub/_C.so")
EOF
}
start=$SECONDS
if ! "$PY" setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  tail -20 "$out/build.log"
  echo "setup.py build_ext failed; building with torch.utils.cpp_extension.load"
  build_jit >>"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; echo "BUILD FAILED"; exit 1; }
fi
echo "build: $((SECONDS - start)) s"
"$PY" -c 'import adapterhub, adapterhub._C as C; print("backend", adapterhub.backend(), "with_cuda", C.with_cuda)' \
  || exit 1

# Does a C++ exception reach Python intact here? torch's own, then this build's CPU and CUDA kernels.
for probe in "torch.mm(torch.ones(2, 3, device='cuda'), torch.ones(2, 3, device='cuda'))" \
  "ops.lora_shrink(torch.ones(2, 3), torch.ones(1, 1, 3), torch.tensor([0, 5]))" \
  "ops.lora_shrink(torch.ones(2, 3).cuda(), torch.ones(1, 1, 3).cuda(), torch.tensor([0, 5]).cuda())"; do
  "$PY" -c "import torch; from adapterhub import ops
try:
    $probe
except Exception as e:
    print('raised', type(e).__name__)" 2>&1 | tail -1 | sed "s|^|exception probe: $probe: |" | tee -a "$out/gpu.txt"
  rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || echo "exception probe: $probe: CRASHED (rc $rc)" | tee -a "$out/gpu.txt"
done

left() { local s=$((deadline - SECONDS - $1)); echo $((s > 30 ? s : 30)); }  # seconds left, keeping $1 back
timeout_flag=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && timeout_flag=(--timeout=120)
start=$SECONDS
timeout "$(left 100)" "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider \
  --durations=8 "${timeout_flag[@]}" 2>&1 | tee "$out/pytest.log" | tail -40
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
echo "tests: $((SECONDS - start)) s"

start=$SECONDS
timeout "$(left 0)" "$PY" -m bench.bench_gpu --out "$out/bench_gpu.md" || status=1
echo "benchmark: $((SECONDS - start)) s"
exit $status
