// CUDA impls of lora_shrink, lora_expand, lora_delta, lora_linear and lora_linear_backward (the
// kernels are in lora_kernels.cuh). Same contract as the CPU impls (expand's optional per-row weight
// is read on the device and multiplies scale in the fp32/fp64 accumulation). lora_linear runs over
// lora_linear_with (csrc/lora_linear.h) with this file's per-column delta; the backward is the
// composite one after raising pending errors.
//
// Dispatch rule, per call, by shape only (nothing is read back from the device):
//   - rows < kSgmvMinBatchRows (decode batches): BGMV, one block row per row, each reading its
//     row's slot on the device.
//   - Larger batches (prefill, chunked prefill): SGMV. One single-block kernel (sgmv_plan_kernel)
//     groups the rows per slot on the device into items of kRows rows, so each weight vector
//     loaded feeds kRows rows; then the SGMV kernels run over those items (empty ones exit).
//   Both paths are the same in eager mode and under CUDA-graph capture: no host sync, no host
//   copy, so a captured graph follows an index (or ranks) rewritten in place between replays.
//   The SGMV path is a register-tiled CUDA-core kernel rather than cuBLAS per segment: the
//   low-rank GEMMs are thin (rank <= 256 columns), t must come out in fp32 from fp16/bf16
//   inputs, and one launch covers all segments instead of several launches per segment.
//
// Index validation rule: kernels never read out of bounds (a slot outside [0, slots) acts as -1,
// a rank is clamped to [0, max_rank]), and report such values without a host sync: the first
// one per device is written to pinned host memory (ErrorSink) and raised as the ValueError the
// CPU backend gives, by the next adapterhub CUDA op called on that device (before it touches
// anything) or by adapterhub.ops.check_routing_errors() (which synchronizes first). The call that
// met the value ran its row as "no adapter". Ranks are checked for the slots rows use.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "checks.h"
#include "lora_kernels.cuh"
#include "lora_linear.h"

namespace adapterhub {
namespace {

using cuda::BgmvExpand;
using cuda::BgmvShrink;
using cuda::SgmvExpand;
using cuda::SgmvShrink;
using OptTensor = c10::optional<at::Tensor>;

static_assert(SgmvShrink::kRows == SgmvExpand::kRows, "shrink and expand share the SGMV row lists");
constexpr int kSgmvRows = SgmvShrink::kRows;
constexpr int64_t kSgmvMinBatchRows = 128;  // batches this long run as SGMV items
constexpr int64_t kMaxRank = 1024;       // bounds expand's shared memory (its t rows): kRows * R * 8 bytes
constexpr int64_t kWideShrinkBlocks = 128;  // fewer shrink blocks than this: 8 warps per block, not 4

template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// ---- routing errors found on the device ----------------------------------------------

constexpr const char* kOpNames[] = {"lora_shrink", "lora_expand", "lora_linear", "lora_delta"};
enum OpCode : int64_t { kShrink = 0, kExpand = 1, kLinear = 2, kDelta = 3 };

// One per device, made at the first call outside capture and kept for the process: the claim word
// (device) and the record (pinned host memory the device writes through its mapping).
struct DeviceErrors {
  unsigned long long* claim = nullptr;
  int64_t* record = nullptr;  // host address
  int64_t* mapped = nullptr;  // the record's device address
};

std::mutex errors_mutex;
std::unordered_map<int, DeviceErrors> device_errors;

// The device's sink, made now unless capturing (allocating would break the capture): then
// this call reports nothing.
cuda::ErrorSink sink_for(int device, OpCode op) {
  std::lock_guard<std::mutex> lock(errors_mutex);
  auto found = device_errors.find(device);
  if (found == device_errors.end()) {
    if (capturing()) return {nullptr, nullptr, op};
    DeviceErrors e;
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&e.record), cuda::kRecordFields * sizeof(int64_t),
                                 cudaHostAllocMapped | cudaHostAllocPortable));
    std::fill(e.record, e.record + cuda::kRecordFields, 0);
    C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&e.claim), sizeof(unsigned long long)));
    C10_CUDA_CHECK(cudaMemset(e.claim, 0, sizeof(unsigned long long)));
    C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&e.mapped), e.record, 0));
    found = device_errors.emplace(device, e).first;
  }
  return {found->second.claim, found->second.mapped, op};
}

// Raises the routing error a kernel reported on `device` since the last one raised, if any (a
// read of host memory, no sync), and frees the sink for the next report (stream-ordered).
void raise_pending(int device) {
  std::ostringstream message;
  {
    std::lock_guard<std::mutex> lock(errors_mutex);
    auto found = device_errors.find(device);
    if (found == device_errors.end()) return;
    volatile int64_t* rec = found->second.record;
    if (rec[0] == 0) return;
    int64_t field[cuda::kRecordFields];
    for (int i = 0; i < cuda::kRecordFields; ++i) field[i] = rec[i];
    for (int i = 0; i < cuda::kRecordFields; ++i) rec[i] = 0;
    if (!capturing()) {
      C10_CUDA_CHECK(cudaMemsetAsync(found->second.claim, 0, sizeof(unsigned long long),
                                     c10::cuda::getCurrentCUDAStream(device)));
    }
    const char* op = kOpNames[field[1] >= kShrink && field[1] <= kDelta ? field[1] : kShrink];
    if (field[2] == cuda::kBadIndex) {
      message << op << ": index values must be in [-1, " << field[5] << ") (slots = " << field[5] << "), got "
              << field[4] << " at row " << field[3];
    } else {
      message << op << ": ranks values must be in [0, max_rank = " << field[6] << "], got " << field[4]
              << " for slot " << field[3];
    }
  }
  TORCH_CHECK_VALUE(false, message.str(),
                    "\n(found on the device by an earlier call on cuda:", device,
                    ", which ran that row as 'no adapter'; CUDA ops check routing values without a host sync "
                    "and raise at the next adapterhub op, or at adapterhub.ops.check_routing_errors())");
}

// Which rows each kernel launch covers. !sgmv: one BGMV launch over every row, no lists.
// Else `items` (device, int64) holds `count` items of kSgmvRows row ids (-1 pads).
struct Plan {
  bool sgmv = false;
  at::Tensor items;
  int64_t count = 0;
};

// Chooses BGMV or SGMV by the batch's length; for SGMV, groups the rows on the device.
Plan plan_routing(const at::Tensor& index, const cuda::Routing& route) {
  Plan plan;
  const int64_t rows = index.size(0);
  if (rows < kSgmvMinBatchRows) return plan;
  const int64_t capacity =
      (rows + std::min(rows, route.slots) * (kSgmvRows - 1) + kSgmvRows - 1) / kSgmvRows * kSgmvRows;
  plan.sgmv = true;
  plan.count = capacity / kSgmvRows;
  plan.items = at::empty({capacity}, index.options());
  auto scratch = at::empty({2 * route.slots}, index.options().dtype(at::kInt));
  const cuda::PlanParams p{route, rows, scratch.data_ptr<int32_t>(), scratch.data_ptr<int32_t>() + route.slots,
                           plan.items.data_ptr<int64_t>(), capacity};
  cuda::sgmv_plan_kernel<kSgmvRows><<<1, cuda::kPlanThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plan;
}

cuda::Routing routing(const at::Tensor& index, const OptTensor& ranks, int64_t slots, int64_t max_rank, OpCode op) {
  return {index.data_ptr<int64_t>(), ranks.has_value() ? ranks->data_ptr<int64_t>() : nullptr, nullptr, slots,
          max_rank, sink_for(index.get_device(), op)};
}

// ---- shrink -------------------------------------------------------------------------

template <typename T, typename Cfg>
void launch_shrink(cuda::ShrinkParams<T> p, const int64_t* items, int64_t count, bool vectorized) {
  if (count == 0) return;
  p.route.items = items;
  const int64_t rank_blocks = (p.route.max_rank + Cfg::kRanks - 1) / Cfg::kRanks;
  const int warps = count * rank_blocks < kWideShrinkBlocks ? cuda::kShrinkMaxWarps : 4;
  const dim3 grid(static_cast<unsigned>(count), static_cast<unsigned>(rank_blocks));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (vectorized) {
    cuda::lora_shrink_kernel<T, cuda::kVecWidth<T>, Cfg><<<grid, 32 * warps, 0, stream>>>(p);
  } else {
    cuda::lora_shrink_kernel<T, 1, Cfg><<<grid, 32 * warps, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// t (rows, R) for checked arguments with rows, R > 0.
at::Tensor shrink(const at::Tensor& x, const at::Tensor& A, const cuda::Routing& route, const Plan& plan) {
  const int64_t rows = x.size(0), in = x.size(1);
  const auto t_options = x.options().dtype(intermediate_dtype(x.scalar_type()));
  // BGMV over every row writes all of t; the SGMV items leave rows with no adapter to at::zeros.
  auto t = plan.sgmv ? at::zeros({rows, route.max_rank}, t_options) : at::empty({rows, route.max_rank}, t_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_shrink_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = cuda::acc_t<T>;
    const cuda::ShrinkParams<T> p{reinterpret_cast<const T*>(x.data_ptr<scalar_t>()),
                                  reinterpret_cast<const T*>(A.data_ptr<scalar_t>()), t.data_ptr<Acc>(), route, in};
    const bool vectorized = in % cuda::kVecWidth<T> == 0 && aligned16(p.x) && aligned16(p.A);
    if (plan.sgmv) {
      launch_shrink<T, SgmvShrink>(p, plan.items.data_ptr<int64_t>(), plan.count, vectorized);
    } else {
      launch_shrink<T, BgmvShrink>(p, nullptr, rows, vectorized);
    }
  });
  return t;
}

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& index,
                            const OptTensor& ranks) {
  const char* op = "lora_shrink";
  check_shrink_args(op, x, A, index, ranks);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), slots = A.size(0), max_rank = A.size(1);
  TORCH_CHECK_VALUE(max_rank <= kMaxRank, op, ": the CUDA kernels support max_rank up to ", kMaxRank,
                    ", got A.size(1) = ", max_rank);
  if (!capturing()) raise_pending(x.get_device());
  if (rows == 0 || max_rank == 0) return at::zeros({rows, max_rank}, x.options().dtype(intermediate_dtype(x.scalar_type())));
  const cuda::Routing route = routing(index, ranks, slots, max_rank, kShrink);
  return shrink(x, A, route, plan_routing(index, route));
}

// ---- expand -------------------------------------------------------------------------

template <typename T, typename Cfg>
void launch_expand(cuda::ExpandParams<T> p, const int64_t* items, int64_t count, bool vectorized) {
  if (count == 0) return;
  p.route.items = items;
  p.lanes = cuda::expand_lanes(p.route.max_rank, vectorized ? cuda::kVecWidth<T> : 1);
  const int64_t per_block = cuda::expand_outputs_per_block<Cfg>(p.lanes);
  const dim3 grid(static_cast<unsigned>(count), static_cast<unsigned>((p.out + per_block - 1) / per_block));
  const size_t smem = Cfg::kRows * p.route.max_rank * sizeof(cuda::acc_t<T>);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (vectorized) {
    cuda::lora_expand_kernel<T, cuda::kVecWidth<T>, Cfg><<<grid, cuda::kExpandThreads, smem, stream>>>(p);
  } else {
    cuda::lora_expand_kernel<T, 1, Cfg><<<grid, cuda::kExpandThreads, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y (rows, out) += the delta of t, for checked arguments with rows, out, R > 0.
void expand(at::Tensor& y, const at::Tensor& t, const at::Tensor& B, const at::Tensor& scale,
            const OptTensor& weight, const cuda::Routing& route, const Plan& plan) {
  const int64_t rows = y.size(0), out = y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lora_expand_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = cuda::acc_t<T>;
    const cuda::ExpandParams<T> p{reinterpret_cast<T*>(y.data_ptr<scalar_t>()), t.data_ptr<Acc>(),
                                  reinterpret_cast<const T*>(B.data_ptr<scalar_t>()), scale.data_ptr<float>(),
                                  weight.has_value() ? weight->data_ptr<float>() : nullptr, route, out, 1};
    const bool vectorized = route.max_rank % cuda::kVecWidth<T> == 0 && aligned16(p.B);
    if (plan.sgmv) {
      launch_expand<T, SgmvExpand>(p, plan.items.data_ptr<int64_t>(), plan.count, vectorized);
    } else {
      launch_expand<T, BgmvExpand>(p, nullptr, rows, vectorized);
    }
  });
}

void lora_expand_cuda(at::Tensor& y, const at::Tensor& t, const at::Tensor& B, const at::Tensor& scale,
                      const at::Tensor& index, const OptTensor& ranks, const OptTensor& weight) {
  const char* op = "lora_expand";
  check_expand_args(op, y, t, B, scale, index, ranks, weight);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t rows = y.size(0), out = y.size(1), slots = B.size(0), max_rank = B.size(2);
  TORCH_CHECK_VALUE(max_rank <= kMaxRank, op, ": the CUDA kernels support max_rank up to ", kMaxRank,
                    ", got B.size(2) = ", max_rank);
  if (!capturing()) raise_pending(y.get_device());
  if (rows == 0 || out == 0 || max_rank == 0) return;
  const cuda::Routing route = routing(index, ranks, slots, max_rank, kExpand);
  expand(y, t, B, scale, weight, route, plan_routing(index, route));
}

// ---- lora_linear: one plan per column, or the fused decode kernel ---------------------

// Which decode kernel lora_delta and lora_linear use on sm_90+ builds: 0 = shrink then expand (two
// launches), 1 = fused (one launch, a cluster per row; elsewhere the two launches run anyway). ADAPTERHUB_CUDA_DECODE=fused|split at start, set_cuda_decode later.
std::atomic<int> decode_mode{std::getenv("ADAPTERHUB_CUDA_DECODE") != nullptr &&
                             std::string(std::getenv("ADAPTERHUB_CUDA_DECODE")) == "fused"};

// Whether the fused kernel for T on `device` was built for sm_90+ (clusters): the device is sm_90+
// and the code loaded for it came from compute_90+ (a build of sm_80 SASS + PTX would JIT the
// compute_80 PTX, whose fused kernel is empty). Asked once per device and dtype (again after a
// failed query).
template <typename T, int VEC>
bool fused_kernel_ready(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, bool> ready;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = ready.find(device);
  if (found != ready.end()) return found->second;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return ready.emplace(device, false).first->second;
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, cuda::lora_fused_decode_kernel<T, VEC>) != cudaSuccess) {
    (void)cudaGetLastError();  // clear this query's (non-sticky) error; ask again next time
    return false;
  }
  return ready.emplace(device, attributes.ptxVersion >= 90).first->second;
}

template <typename T, int VEC>
void launch_fused(const cuda::FusedParams<T>& p, int64_t rows) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(rows * cuda::kFusedCluster));
  config.blockDim = dim3(cuda::kFusedThreads);
  config.dynamicSmemBytes = cuda::fused_smem_bytes<T>(p.route.max_rank);
  config.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute cluster[1];
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = cuda::kFusedCluster;
  cluster[0].val.clusterDim.y = 1;
  cluster[0].val.clusterDim.z = 1;
  config.attrs = cluster;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, cuda::lora_fused_decode_kernel<T, VEC>, p));
}

// y += the delta in one fused launch, if the fused kernel can run here (else false, nothing done).
bool fused_delta(at::Tensor& y, const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& scale, const OptTensor& weight, const cuda::Routing& route) {
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lora_fused_decode", [&] {
    using T = typename CudaType<scalar_t>::type;
    const cuda::FusedParams<T> p{reinterpret_cast<const T*>(x2.data_ptr<scalar_t>()),
                                 reinterpret_cast<const T*>(A.data_ptr<scalar_t>()),
                                 reinterpret_cast<const T*>(B.data_ptr<scalar_t>()),
                                 reinterpret_cast<T*>(y.data_ptr<scalar_t>()),
                                 scale.data_ptr<float>(),
                                 weight.has_value() ? weight->data_ptr<float>() : nullptr,
                                 route,
                                 x2.size(1),
                                 y.size(1)};
    constexpr int V = cuda::kVecWidth<T>;
    const bool vectorized = x2.size(1) % V == 0 && route.max_rank % V == 0 && aligned16(p.x) && aligned16(p.A) &&
                            aligned16(p.B);
    const int device = x2.get_device();
    if (vectorized && fused_kernel_ready<T, V>(device)) {
      launch_fused<T, V>(p, x2.size(0));
      launched = true;
    } else if (!vectorized && fused_kernel_ready<T, 1>(device)) {
      launch_fused<T, 1>(p, x2.size(0));
      launched = true;
    }
  });
  return launched;
}

// y += the delta of x2 for checked arguments: the fused decode kernel where chosen and built, else one
// grouping of the rows for both launches. Errors found on the device are reported as `op`'s, and
// raised by the next op (never half-way through this one).
void add_delta(OpCode op, at::Tensor& y, const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
               const at::Tensor& scale, const at::Tensor& index, const OptTensor& ranks, const OptTensor& weight) {
  const int64_t rows = x2.size(0), slots = A.size(0), max_rank = A.size(1);
  if (rows == 0 || y.size(1) == 0 || max_rank == 0) return;
  const cuda::Routing route = routing(index, ranks, slots, max_rank, op);
  if (decode_mode.load() == 1 && rows < kSgmvMinBatchRows && fused_delta(y, x2, A, B, scale, weight, route)) return;
  const Plan plan = plan_routing(index, route);  // one grouping for both kernels
  expand(y, shrink(x2, A, route, plan), B, scale, weight, route, plan);
}

// lora_linear's DeltaAdder on CUDA (arguments checked by lora_linear_with).
void add_delta_cuda(at::Tensor& y, const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& scale, const at::Tensor& index, const OptTensor& ranks,
                    const OptTensor& weight) {
  add_delta(kLinear, y, x2, A, B, scale, index, ranks, weight);
}

void lora_delta_cuda(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& scale, const at::Tensor& index, const OptTensor& ranks,
                     const OptTensor& weight) {
  check_delta_args("lora_delta", y, x, A, B, scale, index, ranks, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_VALUE(A.size(1) <= kMaxRank, "lora_delta: the CUDA kernels support max_rank up to ", kMaxRank,
                    ", got A.size(1) = ", A.size(1));
  if (!capturing()) raise_pending(x.get_device());
  add_delta(kDelta, y, x, A, B, scale, index, ranks, weight);
}

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& W, const OptTensor& bias, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& scale, const at::Tensor& index,
                            const OptTensor& ranks, const OptTensor& weight) {
  check_linear_args("lora_linear", x, W, bias, A, B, scale, index, ranks, weight);  // first: x may be on the CPU
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_VALUE(A.size(1) <= kMaxRank, "lora_linear: the CUDA kernels support max_rank up to ", kMaxRank,
                    ", got A.size(1) = ", A.size(1));
  if (!capturing()) raise_pending(x.get_device());
  return lora_linear_with(&add_delta_cuda, x, W, bias, A, B, scale, index, ranks, weight);
}

// The backward groups rows on the host (a sync; training only), after raising what is pending.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& W, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& scale, const at::Tensor& index, const OptTensor& ranks, const OptTensor& weight) {
  const char* op = "lora_linear_backward";
  check_backward_args(op, grad_y, x, W);  // first: x may be on the CPU
  check_linear_args(op, x, W, c10::nullopt, A, B, scale, index, ranks, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  if (!capturing()) raise_pending(x.get_device());
  return lora_linear_backward_composite(grad_y, x, W, A, B, scale, index, ranks, weight);
}

}  // namespace

// Waits for every device the ops ran on (those with an error sink), then raises the first routing
// error their kernels reported and no op has raised yet: every call so far is covered.
void raise_routing_errors() {
  std::vector<int> devices;
  {
    std::lock_guard<std::mutex> lock(errors_mutex);
    for (const auto& entry : device_errors) devices.push_back(entry.first);
  }
  for (int device : devices) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    C10_CUDA_CHECK(cudaDeviceSynchronize());
  }
  for (int device : devices) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    raise_pending(device);
  }
}

// "fused" or "split": the decode kernel of lora_delta and lora_linear on sm_90+ from now on; returns
// the previous one.
std::string set_cuda_decode(const std::string& mode) {
  TORCH_CHECK_VALUE(mode == "fused" || mode == "split", "set_cuda_decode: mode must be 'fused' or 'split', got '",
                    mode, "'");
  return decode_mode.exchange(mode == "fused" ? 1 : 0) == 1 ? "fused" : "split";
}

TORCH_LIBRARY_IMPL(adapterhub, CUDA, m) {
  m.impl("lora_shrink", &lora_shrink_cuda);
  m.impl("lora_expand", &lora_expand_cuda);
  m.impl("lora_delta", &lora_delta_cuda);
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace adapterhub
