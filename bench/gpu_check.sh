#!/usr/bin/env bash
# The whole GPU check (issues 4 and 19), for an NVIDIA machine without network, in under 8 minutes:
#   1. build adapterhub._C with its CUDA kernels (system g++; ~50 s on an H100)
#   2. the `cuda` tests: the ops vs float64 (tests/test_cuda.py) and CUDA-graph replay of a tiny
#      Llama with new routings (tests/test_graph_routing.py)
#   3. bench.bench_gpu: the ops against the memory floor, launches, prefill vs grouped GEMM
#   4. bench.gpu_stack: Backbone and a training step vs PEFT on the GPU, bf16
#   5. bench.serve.gpu_engine: the serving engine under load (1 and 64 adapters, shortened)
# Each step gets what is left of CHECK_SECONDS (default 470) minus what the later steps keep back (at least 30 s).
# Writes gpu_check_<device>.md (the summary), gpu_ops_<device>.md, gpu_stack_<device>.md,
# gpu_serve_<device>.md and the logs to $OUT (the device tool's folder), else bench/results/.
# Exit status: non-zero if the build, a test or a benchmark failed.
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
deadline=$((SECONDS + ${CHECK_SECONDS:-470}))
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
# The device's name as every GPU benchmark spells it in its file name (bench.serve.gpu_engine.device_slug):
# "NVIDIA H100 80GB HBM3" -> nvidia-h100-80gb-hbm3.
device="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr '[:upper:]' '[:lower:]' \
  | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')"
device="${device:-device}"
summary="$out/gpu_check_$device.md"
step() {  # step NAME SECONDS STATUS: a line of the summary
  echo "| $1 | $2 s | $3 |" >>"$summary"
}
printf '# bench/gpu_check.sh on %s\n\n%s\n\n| step | time | result |\n|---|---|---|\n' \
  "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" "$(tail -n +2 "$out/gpu.txt" | tr '\n' ' ')" >"$summary"
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
  build_jit >>"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; echo "BUILD FAILED"; step build $((SECONDS - start)) FAILED; exit 1; }
fi
echo "build: $((SECONDS - start)) s"
step build $((SECONDS - start)) ok
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
timeout "$(left 220)" "$PY" -m pytest -m cuda tests/test_cuda.py tests/test_graph_routing.py -q -p no:cacheprovider \
  --durations=8 "${timeout_flag[@]}" 2>&1 | tee "$out/pytest.log" | tail -40
rc=${PIPESTATUS[0]}
[[ $rc == 0 ]] || status=1
step "cuda tests" $((SECONDS - start)) "$(tail -1 "$out/pytest.log" | tr -d '=|') (rc $rc)"

run_step() {  # run_step NAME KEEP_BACK COMMAND...: one benchmark, bounded by what is left
  local name=$1 keep=$2 start=$SECONDS rc
  shift 2
  timeout "$(left "$keep")" "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -15 "$out/$name.log"
  [[ $rc == 0 ]] || status=1
  step "$name" $((SECONDS - start)) "$([[ $rc == 0 ]] && echo ok || echo "FAILED (rc $rc, see $name.log)")"
}
run_step bench_gpu 150 "$PY" -m bench.bench_gpu --out "$out/gpu_ops_$device.md"
run_step gpu_stack 70 "$PY" -m bench.gpu_stack --out "$out"
run_step gpu_serve 0 "$PY" -m bench.serve.gpu_engine --out "$out" --adapters 1 64 --requests 128
echo "total: $SECONDS s"
echo "total: $SECONDS s; exit status $status" >>"$summary"
cat "$summary"
exit $status
