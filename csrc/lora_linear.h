// lora_linear over any way of adding one column's low-rank delta, so a device can swap in its own
// (the CUDA build's fused decode kernel) and keep the rest: checks, the base GEMM, leading dims
// and the (rows, K) columns of composed adapters.
#pragma once
#include <ATen/ATen.h>

namespace adapterhub {

using OptTensor = c10::optional<at::Tensor>;

// y (rows, out) += weight * scale[s] * (x2 (rows, in) @ A[s, :r].T) @ B[s, :, :r].T per row, s = index[row].
// index (rows,), weight (rows,) fp32 or none: one column of lora_linear's routing.
using DeltaAdder = void (*)(at::Tensor& y, const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& scale, const at::Tensor& index, const OptTensor& ranks,
                            const OptTensor& weight);

// The delta through the dispatcher's lora_shrink and lora_expand: every device that has those two.
void add_delta_by_ops(at::Tensor& y, const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
                      const at::Tensor& scale, const at::Tensor& index, const OptTensor& ranks,
                      const OptTensor& weight);

// lora_linear (the op contract's) with `add` for each column's delta.
at::Tensor lora_linear_with(DeltaAdder add, const at::Tensor& x, const at::Tensor& W, const OptTensor& bias,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
                            const at::Tensor& index, const OptTensor& ranks, const OptTensor& weight);

// lora_linear_backward (the op contract's), composed from ATen; groups rows on the host.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_composite(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& W, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& scale, const at::Tensor& index, const OptTensor& ranks, const OptTensor& weight);

}  // namespace adapterhub
