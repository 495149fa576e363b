// CUDA impls of lora_shrink and lora_expand (the kernels are in lora_kernels.cuh).
// Same contract as the CPU impls (expand's optional per-row weight is read on the device and
// multiplies scale in the fp32/fp64 accumulation); lora_linear and its backward come for free from
// csrc/lora_linear.cpp (CompositeExplicitAutograd over these two and at::mm).
//
// Dispatch rule, per call (BGMV vs SGMV):
//   - While the current stream is capturing a CUDA graph: BGMV over every row. It reads each
//     row's slot on the device, so the graph stays valid when the index is rewritten in place
//     between replays, and nothing is synchronised.
//   - Otherwise the index is on the host anyway (validation below). Rows are grouped per slot
//     (segments.h). No segment of >= kSgmvMinRows rows with rank > 0: BGMV over every row
//     (decode: distinct or few-row slots). Else SGMV items of kRows rows for those long
//     segments (each weight vector loaded once per item) plus BGMV for the rows of short
//     segments, both from one small pinned host->device copy of the row lists (prefill).
//   The SGMV path is a register-tiled CUDA-core kernel rather than cuBLAS per segment: the
//   low-rank GEMMs are thin (rank <= 256 columns), t must come out in fp32 from fp16/bf16
//   inputs, and one launch covers all segments instead of several launches per segment.
//
// Index validation rule (kernels never read out of bounds either way: a slot outside
// [0, slots) acts as -1 and a rank is clamped to [0, max_rank]):
//   - Not capturing: index (and ranks, concatenated on the device first) is copied to the host
//     and checked with check_routing_values, giving the same error as the CPU backend. Cost:
//     one tiny kernel (the concatenation, only with ranks), one device->host copy of
//     8 * (rows + slots) bytes and a stream synchronisation, i.e. a few microseconds plus the
//     launch bubble after it; lora_linear pays it twice (shrink and expand). Serve decode from
//     CUDA graphs to avoid it.
//   - Capturing: no check (a check needs a host sync, which capture forbids); whoever builds the
//     index validates it. Out-of-range values then read as "no adapter" / clamped ranks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "lora_kernels.cuh"
#include "segments.h"

namespace adapterhub {
namespace {

using cuda::BgmvExpand;
using cuda::BgmvShrink;
using cuda::SgmvExpand;
using cuda::SgmvShrink;
using OptTensor = c10::optional<at::Tensor>;

static_assert(SgmvShrink::kRows == SgmvExpand::kRows, "shrink and expand share the SGMV row lists");
constexpr int kSgmvRows = SgmvShrink::kRows;
constexpr int64_t kSgmvMinRows = 8;      // a segment this long runs as SGMV items
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

// Which rows each kernel launch covers. all_rows: one BGMV launch over every row, no lists.
// Else `lists` (device, int64) holds sgmv_items * kSgmvRows row ids (-1 pads) then bgmv_items ids.
struct Plan {
  bool all_rows = true;
  at::Tensor lists;
  int64_t sgmv_items = 0;
  int64_t bgmv_items = 0;

  const int64_t* sgmv_list() const { return lists.data_ptr<int64_t>(); }
  const int64_t* bgmv_list() const { return lists.data_ptr<int64_t>() + sgmv_items * kSgmvRows; }
};

// Validates index/ranks values and groups rows per slot, unless capturing (see the rules at the top).
Plan plan_routing(const char* op, const at::Tensor& index, const OptTensor& ranks, int64_t slots, int64_t max_rank) {
  Plan plan;
  if (capturing()) return plan;
  const int64_t rows = index.size(0);
  const at::Tensor host = (ranks.has_value() ? at::cat({index, *ranks}) : index).to(at::kCPU);
  const int64_t* idx = host.data_ptr<int64_t>();
  const int64_t* rk = ranks.has_value() ? idx + rows : nullptr;
  check_routing_values(op, idx, rows, rk, slots, max_rank);

  const Segments seg = group_rows_by_slot(idx, rows, slots);
  std::vector<int64_t> sgmv, bgmv;
  for (int64_t k = 0; k < seg.count(); ++k) {
    if (rk != nullptr && rk[seg.slot[k]] == 0) continue;
    const int64_t n = seg.length(k);
    const int64_t* r = seg.rows_of(k);
    if (n < kSgmvMinRows) {
      bgmv.insert(bgmv.end(), r, r + n);
      continue;
    }
    sgmv.insert(sgmv.end(), r, r + n);
    sgmv.resize((sgmv.size() + kSgmvRows - 1) / kSgmvRows * kSgmvRows, -1);  // pad the last item
  }
  if (sgmv.empty()) return plan;  // BGMV over every row, as under capture

  plan.all_rows = false;
  plan.sgmv_items = static_cast<int64_t>(sgmv.size()) / kSgmvRows;
  plan.bgmv_items = static_cast<int64_t>(bgmv.size());
  auto staged = at::empty({plan.sgmv_items * kSgmvRows + plan.bgmv_items},
                          at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* dst = staged.data_ptr<int64_t>();
  std::copy(sgmv.begin(), sgmv.end(), dst);
  std::copy(bgmv.begin(), bgmv.end(), dst + sgmv.size());
  plan.lists = staged.to(index.device(), /*non_blocking=*/true);
  return plan;
}

cuda::Routing routing(const at::Tensor& index, const OptTensor& ranks, int64_t slots, int64_t max_rank) {
  return {index.data_ptr<int64_t>(), ranks.has_value() ? ranks->data_ptr<int64_t>() : nullptr, nullptr, slots,
          max_rank};
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

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& index,
                            const OptTensor& ranks) {
  const char* op = "lora_shrink";
  check_shrink_args(op, x, A, index, ranks);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), in = x.size(1), slots = A.size(0), max_rank = A.size(1);
  TORCH_CHECK_VALUE(max_rank <= kMaxRank, op, ": the CUDA kernels support max_rank up to ", kMaxRank,
                    ", got A.size(1) = ", max_rank);
  const auto t_options = x.options().dtype(intermediate_dtype(x.scalar_type()));
  if (rows == 0 || max_rank == 0) return at::zeros({rows, max_rank}, t_options);
  const Plan plan = plan_routing(op, index, ranks, slots, max_rank);
  // BGMV over every row writes all of t; the row lists leave rows with no adapter to at::zeros.
  auto t = plan.all_rows ? at::empty({rows, max_rank}, t_options) : at::zeros({rows, max_rank}, t_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_shrink_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = cuda::acc_t<T>;
    const cuda::ShrinkParams<T> p{reinterpret_cast<const T*>(x.data_ptr<scalar_t>()),
                                  reinterpret_cast<const T*>(A.data_ptr<scalar_t>()), t.data_ptr<Acc>(),
                                  routing(index, ranks, slots, max_rank), in};
    const bool vectorized = in % cuda::kVecWidth<T> == 0 && aligned16(p.x) && aligned16(p.A);
    if (plan.all_rows) {
      launch_shrink<T, BgmvShrink>(p, nullptr, rows, vectorized);
    } else {
      launch_shrink<T, SgmvShrink>(p, plan.sgmv_list(), plan.sgmv_items, vectorized);
      launch_shrink<T, BgmvShrink>(p, plan.bgmv_list(), plan.bgmv_items, vectorized);
    }
  });
  return t;
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

void lora_expand_cuda(at::Tensor& y, const at::Tensor& t, const at::Tensor& B, const at::Tensor& scale,
                      const at::Tensor& index, const OptTensor& ranks, const OptTensor& weight) {
  const char* op = "lora_expand";
  check_expand_args(op, y, t, B, scale, index, ranks, weight);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t rows = y.size(0), out = y.size(1), slots = B.size(0), max_rank = B.size(2);
  TORCH_CHECK_VALUE(max_rank <= kMaxRank, op, ": the CUDA kernels support max_rank up to ", kMaxRank,
                    ", got B.size(2) = ", max_rank);
  if (rows == 0 || out == 0 || max_rank == 0) return;
  const Plan plan = plan_routing(op, index, ranks, slots, max_rank);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lora_expand_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = cuda::acc_t<T>;
    const cuda::ExpandParams<T> p{reinterpret_cast<T*>(y.data_ptr<scalar_t>()), t.data_ptr<Acc>(),
                                  reinterpret_cast<const T*>(B.data_ptr<scalar_t>()), scale.data_ptr<float>(),
                                  weight.has_value() ? weight->data_ptr<float>() : nullptr,
                                  routing(index, ranks, slots, max_rank), out, 1};
    const bool vectorized = max_rank % cuda::kVecWidth<T> == 0 && aligned16(p.B);
    if (plan.all_rows) {
      launch_expand<T, BgmvExpand>(p, nullptr, rows, vectorized);
    } else {
      launch_expand<T, SgmvExpand>(p, plan.sgmv_list(), plan.sgmv_items, vectorized);
      launch_expand<T, BgmvExpand>(p, plan.bgmv_list(), plan.bgmv_items, vectorized);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(adapterhub, CUDA, m) {
  m.impl("lora_shrink", &lora_shrink_cuda);
  m.impl("lora_expand", &lora_expand_cuda);
}

}  // namespace adapterhub
