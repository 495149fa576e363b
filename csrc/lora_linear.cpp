// lora_linear, its backward and lora_delta, composed from ATen and the per-device kernels of
// lora_shrink / lora_expand, so every device that has those two gets these too.
//
//   y[i] = x[i] @ W.T + bias + sum_k w[i, k] * scale[s] * (x[i] @ A[s, :r].T) @ B[s, :, :r].T
//   s = index[i, k] (-1: nothing), r = ranks[s], w = weight (none: 1)
//
// index is (n0,) (K = 1) or (n0, K): K (slot, weight) pairs per row, adapters composed per
// request; each column is one shrink/expand pair. x may carry leading batch dims: x (n0, ..., in);
// entry i routes every position of x[i] (per-sequence routing). For per-token routing, flatten x
// to (tokens, in).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "lora_linear.h"
#include "segments.h"

namespace adapterhub {
namespace {

at::Tensor call_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& index, const OptTensor& ranks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adapterhub::lora_shrink", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&)>();
  return op.call(x, A, index, ranks);
}

void call_expand(at::Tensor& y, const at::Tensor& t, const at::Tensor& B, const at::Tensor& scale,
                 const at::Tensor& index, const OptTensor& ranks, const OptTensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adapterhub::lora_expand", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, const OptTensor&)>();
  op.call(y, t, B, scale, index, ranks, weight);
}

// index or weight (n0,) or (n0, K) -> (rows,) or (rows, K) for x (n0, ..., in) flattened to (rows, in).
at::Tensor index_per_row(const at::Tensor& index, int64_t rows) {
  const int64_t n0 = index.size(0);
  if (n0 == rows || n0 == 0) return index;
  return index.repeat_interleave(rows / n0, /*dim=*/0);
}

// Columns of a (rows, K) index: K; a (rows,) index is one column.
int64_t column_count(const at::Tensor& index) { return index.dim() == 2 ? index.size(1) : 1; }

// Column k of a (rows, K) index or weight, contiguous (rows,); a 1-D one is its only column.
at::Tensor column(const at::Tensor& m, int64_t k) { return m.dim() == 2 ? m.select(1, k).contiguous() : m; }

OptTensor column(const OptTensor& m, int64_t k) {
  return m.has_value() ? OptTensor(column(*m, k)) : c10::nullopt;
}

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& W, const OptTensor& bias, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& scale, const at::Tensor& index, const OptTensor& ranks,
                       const OptTensor& weight) {
  return lora_linear_with(&add_delta_by_ops, x, W, bias, A, B, scale, index, ranks, weight);
}

}  // namespace

// Gradients of lora_linear for 2-D grad_y (rows, out) and x (rows, in), index (rows,) or (rows, K):
// grad_x (rows, in) including grad_y @ W, grad_A like A, grad_B like B, summed over the columns
// (a slot may recur across rows and columns). Rows are grouped per slot on the host, per column;
// each segment is a handful of small GEMMs. A row's weight scales both paths through its delta.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_composite(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& W, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& scale, const at::Tensor& index, const OptTensor& ranks, const OptTensor& weight) {
  const char* op = "lora_linear_backward";
  check_backward_args(op, grad_y, x, W);
  check_linear_args(op, x, W, c10::nullopt, A, B, scale, index, ranks, weight);
  const int64_t slots = A.size(0), max_rank = A.size(1);
  const auto acc = intermediate_dtype(x.scalar_type());
  auto grad_x = grad_y.mm(W);
  auto grad_A = at::zeros(A.sizes(), A.options().dtype(acc));  // summed in acc, rounded once at the end
  auto grad_B = at::zeros(B.sizes(), B.options().dtype(acc));
  auto index_host = index.cpu();
  auto scale_host = scale.cpu();
  auto ranks_host = ranks.has_value() ? c10::optional<at::Tensor>(ranks->cpu()) : c10::nullopt;
  const int64_t* rk = ranks_host.has_value() ? ranks_host->data_ptr<int64_t>() : nullptr;
  check_routing_values(op, index_host.data_ptr<int64_t>(), x.size(0), rk, slots, max_rank,
                       index.dim() == 2 ? index.size(1) : 0);
  for (int64_t c = 0; c < column_count(index); ++c) {
    const auto idx = column(index_host, c);
    const OptTensor w = column(weight, c);  // (rows,) on x's device
    const Segments seg = group_rows_by_slot(idx.data_ptr<int64_t>(), x.size(0), slots);
    for (int64_t k = 0; k < seg.count(); ++k) {
      const int64_t s = seg.slot[k], r = rk == nullptr ? max_rank : rk[s];
      if (r == 0) continue;
      const double sc = scale_host.data_ptr<float>()[s];
      auto rows = at::from_blob(const_cast<int64_t*>(seg.rows_of(k)), {seg.length(k)}, at::kLong).to(x.device());
      auto xs = x.index_select(0, rows).to(acc);                          // (n, in)
      auto gs = grad_y.index_select(0, rows).to(acc);                     // (n, out)
      auto As = A.select(0, s).narrow(0, 0, r).to(acc);                   // (r, in)
      auto Bs = B.select(0, s).narrow(1, 0, r).to(acc);                   // (out, r)
      auto ts = xs.mm(As.t());                                            // (n, r)
      auto us = gs.mm(Bs);                                                // (n, r)
      if (w.has_value()) {
        auto ws = w->index_select(0, rows).to(acc).unsqueeze(1);          // (n, 1)
        ts.mul_(ws);
        us.mul_(ws);
      }
      grad_x.index_add_(0, rows, us.mm(As).mul_(sc).to(grad_x.scalar_type()));
      grad_B.select(0, s).narrow(1, 0, r).add_(gs.t().mm(ts).mul_(sc));  // (out, r)
      grad_A.select(0, s).narrow(0, 0, r).add_(us.t().mm(xs).mul_(sc));  // (r, in)
    }
  }
  return {grad_x, grad_A.to(A.scalar_type()), grad_B.to(B.scalar_type())};
}

void add_delta_by_ops(at::Tensor& y, const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
                      const at::Tensor& scale, const at::Tensor& index, const OptTensor& ranks,
                      const OptTensor& weight) {
  auto t = call_shrink(x2, A, index, ranks);  // (rows, max_rank) fp32
  call_expand(y, t, B, scale, index, ranks, weight);
}

at::Tensor lora_linear_with(DeltaAdder add, const at::Tensor& x, const at::Tensor& W, const OptTensor& bias,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
                            const at::Tensor& index, const OptTensor& ranks, const OptTensor& weight) {
  check_linear_args("lora_linear", x, W, bias, A, B, scale, index, ranks, weight);
  if (index.device().is_cpu()) {  // on a GPU the kernels check, on the device
    check_routing_values("lora_linear", index.data_ptr<int64_t>(), index.size(0),
                         ranks.has_value() ? ranks->data_ptr<int64_t>() : nullptr, A.size(0), A.size(1),
                         index.dim() == 2 ? index.size(1) : 0);
  }
  const int64_t in = x.size(-1), out = W.size(0);
  auto x2 = x.view({-1, in});                                              // (rows, in)
  auto y = bias.has_value() ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());  // (rows, out)
  auto idx = index_per_row(index, x2.size(0));  // (rows,) or (rows, K)
  const OptTensor w = weight.has_value() ? OptTensor(index_per_row(*weight, x2.size(0))) : c10::nullopt;
  for (int64_t k = 0; k < column_count(idx); ++k) add(y, x2, A, B, scale, column(idx, k), ranks, column(w, k));
  auto shape = x.sizes().vec();
  shape.back() = out;
  return y.view(shape);
}

namespace {

// lora_delta for any device with lora_shrink and lora_expand (CPU: values checked here, under its name).
void lora_delta(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
                const at::Tensor& index, const OptTensor& ranks, const OptTensor& weight) {
  check_delta_args("lora_delta", y, x, A, B, scale, index, ranks, weight);
  if (index.device().is_cpu()) {
    check_routing_values("lora_delta", index.data_ptr<int64_t>(), index.size(0),
                         ranks.has_value() ? ranks->data_ptr<int64_t>() : nullptr, A.size(0), A.size(1));
  }
  add_delta_by_ops(y, x, A, B, scale, index, ranks, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(adapterhub, CompositeExplicitAutograd, m) {
  m.impl("lora_delta", &lora_delta);
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward_composite);
}

}  // namespace adapterhub
