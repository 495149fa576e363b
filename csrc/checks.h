// Argument checks shared by every backend of the gathered low-rank ops.
// Each failure names the op, the argument, what was expected and what came.
#pragma once
#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace adapterhub {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ", shape_str(t));
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t d, int64_t expected,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(d) == expected, op, ": ", name, ".size(", d, ") (", what, ") must be ", expected, ", got ",
              t.size(d), " (shape ", shape_str(t), ")");
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", shape_str(t), ", strides ",
              t.strides(), "); call .contiguous() on it first");
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but x is on ", ref.device(),
              "; move all arguments to one device");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected,
                        const char* why) {
  TORCH_CHECK_VALUE(t.scalar_type() == expected, op, ": ", name, " must be ", c10::toString(expected), " (", why,
              "), got ", c10::toString(t.scalar_type()));
}

inline void check_floating(const char* op, const at::Tensor& x) {
  auto s = x.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", c10::toString(s));
}

// The dtype of the low-rank intermediate t: fp32, or fp64 for fp64 inputs.
inline at::ScalarType intermediate_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// index (rows,) int64, or (rows, K) with K >= 1 where `columns` (lora_linear and its backward); weight
// none or float32 of index's shape; ranks (slots,) int64: layout only; values are checked where they are read.
inline void check_routing(const char* op, const at::Tensor& index, const c10::optional<at::Tensor>& ranks,
                          int64_t rows, int64_t slots, const at::Tensor& x,
                          const c10::optional<at::Tensor>& weight = c10::nullopt, bool columns = false) {
  if (columns) {
    TORCH_CHECK_VALUE(index.dim() == 1 || index.dim() == 2, op,
                      ": index must be 1-D (rows,) or 2-D (rows, K), got shape ", shape_str(index));
    TORCH_CHECK_VALUE(index.dim() == 1 || index.size(1) > 0, op,
                      ": index (rows, K) needs K >= 1 slot ids per row, got shape ", shape_str(index));
  } else {
    TORCH_CHECK_VALUE(index.dim() != 2, op, ": index must be 1-D (rows,), got shape ", shape_str(index),
                      "; only lora_linear takes (rows, K): call ", op, " once per column");
    check_dim(op, "index", index, 1, "(rows,)");
  }
  check_dtype(op, "index", index, at::kLong, "one slot id per row, -1 = no adapter");
  TORCH_CHECK_VALUE(index.size(0) == rows, op, ": index has ", index.size(0), " entries but the batch has ", rows,
              " rows; give one slot id per row (-1 = no adapter)");
  check_same_device(op, "index", index, x);
  check_contiguous(op, "index", index);
  if (weight.has_value()) {
    const auto& w = *weight;
    const bool two_d = index.dim() == 2;
    check_dim(op, "weight", w, index.dim(), two_d ? "(rows, K), the shape of index" : "(rows,), the shape of index");
    check_dtype(op, "weight", w, at::kFloat, "one float32 weight per index entry");
    check_size(op, "weight", w, 0, index.size(0), "rows, = index.size(0)");
    if (two_d) check_size(op, "weight", w, 1, index.size(1), "K, = index.size(1)");
    check_same_device(op, "weight", w, x);
    check_contiguous(op, "weight", w);
  }
  if (ranks.has_value()) {
    const auto& r = *ranks;
    check_dim(op, "ranks", r, 1, "(slots,)");
    check_dtype(op, "ranks", r, at::kLong, "the rank in use per slot");
    check_size(op, "ranks", r, 0, slots, "slots");
    check_same_device(op, "ranks", r, x);
    check_contiguous(op, "ranks", r);
  }
}

// Host-side value checks (CPU tensors): index (rows,) or, with columns = K > 0, (rows, K) row-major, in
// [-1, slots); ranks in [0, max_rank].
inline void check_routing_values(const char* op, const int64_t* index, int64_t rows, const int64_t* ranks,
                                 int64_t slots, int64_t max_rank, int64_t columns = 0) {
  const int64_t per_row = columns > 0 ? columns : 1;
  for (int64_t i = 0; i < rows * per_row; ++i) {
    if (index[i] >= -1 && index[i] < slots) continue;
    std::ostringstream where;
    where << "row " << i / per_row;
    if (columns > 0) where << ", column " << i % per_row;
    TORCH_CHECK_VALUE(false, op, ": index values must be in [-1, ", slots, ") (slots = ", slots, "), got ", index[i],
                      " at ", where.str());
  }
  if (ranks != nullptr) {
    for (int64_t s = 0; s < slots; ++s) {
      TORCH_CHECK_VALUE(ranks[s] >= 0 && ranks[s] <= max_rank, op, ": ranks values must be in [0, max_rank = ", max_rank,
                  "], got ", ranks[s], " for slot ", s);
    }
  }
}

// x (rows, in), A (slots, max_rank, in).
inline void check_shrink_args(const char* op, const at::Tensor& x, const at::Tensor& A, const at::Tensor& index,
                              const c10::optional<at::Tensor>& ranks) {
  check_floating(op, x);
  check_dim(op, "x", x, 2, "(rows, in)");
  check_dim(op, "A", A, 3, "(slots, max_rank, in)");
  check_size(op, "A", A, 2, x.size(1), "in features, = x.size(1)");
  check_dtype(op, "A", A, x.scalar_type(), "the dtype of x");
  check_same_device(op, "A", A, x);
  check_contiguous(op, "x", x);
  check_contiguous(op, "A", A);
  check_routing(op, index, ranks, x.size(0), A.size(0), x);
}

// y (rows, out), t (rows, max_rank) fp32 (fp64 for fp64 y), B (slots, out, max_rank), scale (slots,) fp32,
// weight (rows,) fp32 or none.
inline void check_expand_args(const char* op, const at::Tensor& y, const at::Tensor& t, const at::Tensor& B,
                              const at::Tensor& scale, const at::Tensor& index,
                              const c10::optional<at::Tensor>& ranks, const c10::optional<at::Tensor>& weight) {
  check_floating(op, y);
  check_dim(op, "y", y, 2, "(rows, out)");
  check_dim(op, "B", B, 3, "(slots, out, max_rank)");
  check_size(op, "B", B, 1, y.size(1), "out features, = y.size(1)");
  check_dtype(op, "B", B, y.scalar_type(), "the dtype of y");
  check_dim(op, "t", t, 2, "(rows, max_rank)");
  check_size(op, "t", t, 0, y.size(0), "rows, = y.size(0)");
  check_size(op, "t", t, 1, B.size(2), "max_rank, = B.size(2)");
  check_dtype(op, "t", t, intermediate_dtype(y.scalar_type()), "the lora_shrink output for this dtype");
  check_dim(op, "scale", scale, 1, "(slots,)");
  check_size(op, "scale", scale, 0, B.size(0), "slots, = B.size(0)");
  check_dtype(op, "scale", scale, at::kFloat, "one float32 scaling per slot");
  for (auto [name, tensor] : {std::pair<const char*, const at::Tensor*>{"t", &t}, {"B", &B}, {"scale", &scale}}) {
    check_same_device(op, name, *tensor, y);
  }
  check_contiguous(op, "y", y);
  check_contiguous(op, "t", t);
  check_contiguous(op, "B", B);
  check_contiguous(op, "scale", scale);
  check_routing(op, index, ranks, y.size(0), B.size(0), y, weight);
}

// y (rows, out), x (rows, in), A (slots, max_rank, in), B (slots, out, max_rank), scale (slots,) fp32,
// index (rows,), weight (rows,) fp32 or none: lora_delta.
inline void check_delta_args(const char* op, const at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                             const at::Tensor& B, const at::Tensor& scale, const at::Tensor& index,
                             const c10::optional<at::Tensor>& ranks, const c10::optional<at::Tensor>& weight) {
  check_floating(op, x);
  check_dim(op, "x", x, 2, "(rows, in)");
  check_dim(op, "y", y, 2, "(rows, out)");
  check_size(op, "y", y, 0, x.size(0), "rows, = x.size(0)");
  check_dim(op, "A", A, 3, "(slots, max_rank, in)");
  check_size(op, "A", A, 2, x.size(1), "in features, = x.size(1)");
  check_dim(op, "B", B, 3, "(slots, out, max_rank)");
  check_size(op, "B", B, 0, A.size(0), "slots, = A.size(0)");
  check_size(op, "B", B, 1, y.size(1), "out features, = y.size(1)");
  check_size(op, "B", B, 2, A.size(1), "max_rank, = A.size(1)");
  for (auto [name, tensor] : {std::pair<const char*, const at::Tensor*>{"y", &y}, {"A", &A}, {"B", &B}}) {
    check_dtype(op, name, *tensor, x.scalar_type(), "the dtype of x");
  }
  check_dim(op, "scale", scale, 1, "(slots,)");
  check_size(op, "scale", scale, 0, A.size(0), "slots, = A.size(0)");
  check_dtype(op, "scale", scale, at::kFloat, "one float32 scaling per slot");
  for (auto [name, tensor] :
       {std::pair<const char*, const at::Tensor*>{"y", &y}, {"A", &A}, {"B", &B}, {"scale", &scale}}) {
    check_same_device(op, name, *tensor, x);
  }
  for (auto [name, tensor] : {std::pair<const char*, const at::Tensor*>{"x", &x}, {"y", &y}, {"A", &A}, {"B", &B},
                              {"scale", &scale}}) {
    check_contiguous(op, name, *tensor);
  }
  check_routing(op, index, ranks, x.size(0), A.size(0), x, weight);
}

// x (rows..., in), W (out, in), bias (out,), A (slots, max_rank, in), B (slots, out, max_rank),
// index (rows,) or (rows, K), weight none or fp32 of index's shape.
inline void check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& W,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& scale, const at::Tensor& index,
                              const c10::optional<at::Tensor>& ranks, const c10::optional<at::Tensor>& weight) {
  check_floating(op, x);
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be (rows, in) or (batch, ..., in), got shape ", shape_str(x));
  check_contiguous(op, "x", x);
  check_dim(op, "W", W, 2, "(out, in)");
  check_size(op, "W", W, 1, x.size(-1), "in features, = x.size(-1)");
  check_dtype(op, "W", W, x.scalar_type(), "the dtype of x");
  check_same_device(op, "W", W, x);
  if (bias.has_value()) {
    check_dim(op, "bias", *bias, 1, "(out,)");
    check_size(op, "bias", *bias, 0, W.size(0), "out features, = W.size(0)");
    check_dtype(op, "bias", *bias, x.scalar_type(), "the dtype of x");
    check_same_device(op, "bias", *bias, x);
  }
  check_dim(op, "A", A, 3, "(slots, max_rank, in)");
  check_size(op, "A", A, 2, x.size(-1), "in features, = x.size(-1)");
  check_dim(op, "B", B, 3, "(slots, out, max_rank)");
  check_size(op, "B", B, 0, A.size(0), "slots, = A.size(0)");
  check_size(op, "B", B, 1, W.size(0), "out features, = W.size(0)");
  check_size(op, "B", B, 2, A.size(1), "max_rank, = A.size(1)");
  check_dtype(op, "A", A, x.scalar_type(), "the dtype of x");
  check_dtype(op, "B", B, x.scalar_type(), "the dtype of x");
  check_dim(op, "scale", scale, 1, "(slots,)");
  check_size(op, "scale", scale, 0, A.size(0), "slots, = A.size(0)");
  check_dtype(op, "scale", scale, at::kFloat, "one float32 scaling per slot");
  for (auto [name, tensor] : {std::pair<const char*, const at::Tensor*>{"A", &A}, {"B", &B}, {"scale", &scale}}) {
    check_same_device(op, name, *tensor, x);
    check_contiguous(op, name, *tensor);
  }
  check_routing(op, index, ranks, x.size(0), A.size(0), x, weight, /*columns=*/true);
}

// grad_y (rows, out) and x (rows, in) of lora_linear_backward, on top of check_linear_args.
inline void check_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& W) {
  check_dim(op, "x", x, 2, "(rows, in)");
  check_dim(op, "grad_y", grad_y, 2, "(rows, out)");
  check_size(op, "grad_y", grad_y, 0, x.size(0), "rows, = x.size(0)");
  check_size(op, "grad_y", grad_y, 1, W.size(0), "out features, = W.size(0)");
  check_dtype(op, "grad_y", grad_y, x.scalar_type(), "the dtype of x");
  check_same_device(op, "grad_y", grad_y, x);
  check_contiguous(op, "grad_y", grad_y);
}

}  // namespace adapterhub
