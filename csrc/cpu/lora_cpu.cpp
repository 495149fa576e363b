// CPU kernels of lora_shrink and lora_expand.
//
// Rows are grouped into per-slot segments (SGMV). A segment of at least
// kMinRowsForGemm rows runs as one small GEMM (prefill: a few segments, many rows);
// shorter segments run row by row as gathered dot products in parallel over rows
// (decode: each row its own slot, memory-bound on the slot's weights). The
// per-slot rank bounds every loop, so zero padding up to max_rank is never read.
// lora_expand's optional per-row weight is folded into t first, in t's dtype (fp32, fp64 for
// fp64): scale is applied where it always was, and weight = 1 gives the bits of no weight.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "segments.h"
#include "cpu/row_kernels.h"

namespace adapterhub {
namespace {

constexpr int64_t kMinRowsForGemm = 8;
constexpr int64_t kOutChunk = 256;  // expand splits a row's outputs into chunks of this many for parallelism

inline int64_t rank_of(const int64_t* ranks, int64_t slot, int64_t max_rank) {
  return ranks == nullptr ? max_rank : ranks[slot];
}

at::Tensor rows_tensor(const Segments& seg, int64_t k) {
  // A view of the segment's row ids; valid while `seg` lives (CPU ops run synchronously).
  return at::from_blob(const_cast<int64_t*>(seg.rows_of(k)), {seg.length(k)}, at::kLong);
}

at::Tensor segment_rows(const at::Tensor& m, const Segments& seg, int64_t k) {
  if (seg.is_range(k)) return m.narrow(0, seg.rows_of(k)[0], seg.length(k));
  return m.index_select(0, rows_tensor(seg, k));
}

// t (rows, max_rank) for the segment's rows: x_seg (n, in) @ A[s, :r].T, in the dtype of t.
void shrink_segment_gemm(const at::Tensor& x, const at::Tensor& A, const Segments& seg, int64_t k, int64_t r,
                         at::Tensor& t) {
  auto xs = segment_rows(x, seg, k).to(t.scalar_type());                  // (n, in)
  auto As = A.select(0, seg.slot[k]).narrow(0, 0, r).to(t.scalar_type());  // (r, in)
  auto ts = at::mm(xs, As.t());                                            // (n, r)
  if (seg.is_range(k)) {
    t.narrow(0, seg.rows_of(k)[0], seg.length(k)).narrow(1, 0, r).copy_(ts);
  } else {
    t.narrow(1, 0, r).index_copy_(0, rows_tensor(seg, k), ts);
  }
}

// y[rows] += scale * t[rows, :r] @ B[s, :, :r].T, rounded to y's dtype once.
void expand_segment_gemm(at::Tensor& y, const at::Tensor& t, const at::Tensor& B, float scale, const Segments& seg,
                         int64_t k, int64_t r) {
  auto ts = segment_rows(t, seg, k).narrow(1, 0, r);                          // (n, r)
  auto Bs = B.select(0, seg.slot[k]).narrow(1, 0, r).to(t.scalar_type());  // (out, r)
  if (y.scalar_type() == t.scalar_type() && seg.is_range(k)) {
    y.narrow(0, seg.rows_of(k)[0], seg.length(k)).addmm_(ts, Bs.t(), 1, scale);
    return;
  }
  auto delta = at::mm(ts, Bs.t());  // (n, out)
  if (y.scalar_type() == t.scalar_type()) {
    y.index_add_(0, rows_tensor(seg, k), delta, scale);
    return;
  }
  auto ys = segment_rows(y, seg, k).to(t.scalar_type()).add_(delta, scale).to(y.scalar_type());
  if (seg.is_range(k)) {
    y.narrow(0, seg.rows_of(k)[0], seg.length(k)).copy_(ys);
  } else {
    y.index_copy_(0, rows_tensor(seg, k), ys);
  }
}

// t[i, :r] = x[i] @ A[s, :r].T for each listed row i, s = index[i].
template <typename scalar_t>
void shrink_rows(const at::Tensor& x, const at::Tensor& A, const int64_t* index, const int64_t* ranks,
                 const std::vector<int64_t>& rows, at::Tensor& t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t in = x.size(1), max_rank = A.size(1);
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* A_ptr = A.data_ptr<scalar_t>();
  acc_t* t_ptr = t.data_ptr<acc_t>();
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x_acc(std::is_same_v<acc_t, scalar_t> ? 0 : in);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i = rows[p], s = index[i], r = rank_of(ranks, s, max_rank);
      const scalar_t* xi = x_ptr + i * in;
      const acc_t* xa;
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        xa = xi;
      } else {
        for (int64_t c = 0; c < in; ++c) x_acc[c] = static_cast<acc_t>(xi[c]);
        xa = x_acc.data();
      }
      const scalar_t* As = A_ptr + s * max_rank * in;
      acc_t* ti = t_ptr + i * max_rank;
      for (int64_t q = 0; q < r; ++q) ti[q] = cpu::dot(xa, As + q * in, in);
    }
  });
}

// y[i] += scale[s] * t[i, :r] @ B[s, :, :r].T for each listed row i; work split over (row, output chunk).
template <typename scalar_t>
void expand_rows(at::Tensor& y, const at::Tensor& t, const at::Tensor& B, const float* scale, const int64_t* index,
                 const int64_t* ranks, const std::vector<int64_t>& rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t out = y.size(1), max_rank = B.size(2);
  const int64_t chunks = (out + kOutChunk - 1) / kOutChunk;
  scalar_t* y_ptr = y.data_ptr<scalar_t>();
  const acc_t* t_ptr = t.data_ptr<acc_t>();
  const scalar_t* B_ptr = B.data_ptr<scalar_t>();
  const int64_t work = static_cast<int64_t>(rows.size()) * chunks;
  at::parallel_for(0, work, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> c(max_rank), delta(kOutChunk);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = rows[w / chunks], s = index[i], r = rank_of(ranks, s, max_rank);
      const int64_t o_begin = (w % chunks) * kOutChunk, o_end = std::min(out, o_begin + kOutChunk);
      const acc_t sc = static_cast<acc_t>(scale[s]);
      for (int64_t q = 0; q < r; ++q) c[q] = sc * t_ptr[i * max_rank + q];  // scale folded into t
      cpu::gemv_rows(c.data(), B_ptr + s * out * max_rank, max_rank, r, o_begin, o_end, delta.data());
      scalar_t* yi = y_ptr + i * out;
      for (int64_t o = o_begin; o < o_end; ++o) {
        yi[o] = static_cast<scalar_t>(static_cast<acc_t>(yi[o]) + delta[o - o_begin]);
      }
    }
  });
}

// Splits segments into GEMM-sized ones (returned) and the rows of the short ones (`short_rows`).
std::vector<int64_t> split_segments(const Segments& seg, const int64_t* ranks, int64_t max_rank,
                                    std::vector<int64_t>& short_rows) {
  std::vector<int64_t> long_segments;
  for (int64_t k = 0; k < seg.count(); ++k) {
    if (rank_of(ranks, seg.slot[k], max_rank) == 0) continue;
    if (seg.length(k) >= kMinRowsForGemm) {
      long_segments.push_back(k);
    } else {
      short_rows.insert(short_rows.end(), seg.rows_of(k), seg.rows_of(k) + seg.length(k));
    }
  }
  return long_segments;
}

const int64_t* ranks_ptr(const c10::optional<at::Tensor>& ranks) {
  return ranks.has_value() ? ranks->data_ptr<int64_t>() : nullptr;
}

at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& index,
                           const c10::optional<at::Tensor>& ranks) {
  check_shrink_args("lora_shrink", x, A, index, ranks);
  const int64_t rows = x.size(0), slots = A.size(0), max_rank = A.size(1);
  auto t = at::zeros({rows, max_rank}, x.options().dtype(intermediate_dtype(x.scalar_type())));
  const int64_t* idx = index.data_ptr<int64_t>();
  const int64_t* rk = ranks_ptr(ranks);
  check_routing_values("lora_shrink", idx, rows, rk, slots, max_rank);
  const Segments seg = group_rows_by_slot(idx, rows, slots);
  std::vector<int64_t> short_rows;
  for (int64_t k : split_segments(seg, rk, max_rank, short_rows)) {
    shrink_segment_gemm(x, A, seg, k, rank_of(rk, seg.slot[k], max_rank), t);
  }
  if (!short_rows.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_shrink_cpu",
                                    [&] { shrink_rows<scalar_t>(x, A, idx, rk, short_rows, t); });
  }
  return t;
}

void lora_expand_cpu(at::Tensor& y, const at::Tensor& t, const at::Tensor& B, const at::Tensor& scale,
                     const at::Tensor& index, const c10::optional<at::Tensor>& ranks,
                     const c10::optional<at::Tensor>& weight) {
  check_expand_args("lora_expand", y, t, B, scale, index, ranks, weight);
  const int64_t rows = y.size(0), slots = B.size(0), max_rank = B.size(2);
  if (rows == 0) return;
  const int64_t* idx = index.data_ptr<int64_t>();
  const int64_t* rk = ranks_ptr(ranks);
  const float* sc = scale.data_ptr<float>();
  check_routing_values("lora_expand", idx, rows, rk, slots, max_rank);
  // (rows, max_rank): t with each row times its weight; weight = 1 leaves every bit of t.
  const at::Tensor tw = weight.has_value() ? t * weight->to(t.scalar_type()).unsqueeze(1) : t;
  const Segments seg = group_rows_by_slot(idx, rows, slots);
  std::vector<int64_t> short_rows;
  for (int64_t k : split_segments(seg, rk, max_rank, short_rows)) {
    expand_segment_gemm(y, tw, B, sc[seg.slot[k]], seg, k, rank_of(rk, seg.slot[k], max_rank));
  }
  if (!short_rows.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lora_expand_cpu",
                                    [&] { expand_rows<scalar_t>(y, tw, B, sc, idx, rk, short_rows); });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(adapterhub, CPU, m) {
  m.impl("lora_shrink", &lora_shrink_cpu);
  m.impl("lora_expand", &lora_expand_cpu);
}

}  // namespace adapterhub
