"""Argument checks of the gathered low-rank ops, for the fallback and the fake (meta) kernels.

They say the same as csrc/checks.h: the op, the argument, what was expected and what came.
Shape, dtype, device and layout checks need no data; `check_routing_values` reads the
index and ranks and is only called where real data exists.
"""

from __future__ import annotations

import torch

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the low-rank intermediate t: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _name(dtype: torch.dtype) -> str:
    return {
        torch.float32: "Float",
        torch.float64: "Double",
        torch.bfloat16: "BFloat16",
        torch.float16: "Half",
        torch.int64: "Long",
        torch.int32: "Int",
    }.get(dtype, str(dtype))


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    if t.dim() != dim:
        _fail(op, f"{name} must be {dim}-D {layout}, got shape {list(t.shape)}")


def check_size(op: str, name: str, t: torch.Tensor, d: int, expected: int, what: str) -> None:
    if t.size(d) != expected:
        _fail(op, f"{name}.size({d}) ({what}) must be {expected}, got {t.size(d)} (shape {list(t.shape)})")


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        _fail(
            op,
            f"{name} must be contiguous (shape {list(t.shape)}, strides {list(t.stride())}); "
            "call .contiguous() on it first",
        )


def check_same_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} is on {t.device} but x is on {ref.device}; move all arguments to one device")


def check_dtype(op: str, name: str, t: torch.Tensor, expected: torch.dtype, why: str) -> None:
    if t.dtype != expected:
        _fail(op, f"{name} must be {_name(expected)} ({why}), got {_name(t.dtype)}")


def check_floating(op: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOATING:
        _fail(op, f"x must be float32, float64, bfloat16 or float16, got {_name(x.dtype)}")


def check_routing(
    op: str,
    index: torch.Tensor,
    ranks: torch.Tensor | None,
    rows: int,
    slots: int,
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    columns: bool = False,
) -> None:
    """index (rows,) int64, or (rows, K) with K >= 1 where `columns` (lora_linear and its backward);
    weight None or float32 of index's shape; ranks (slots,) int64 or None. Layout only."""
    if columns:
        if index.dim() not in (1, 2):
            _fail(op, f"index must be 1-D (rows,) or 2-D (rows, K), got shape {list(index.shape)}")
        if index.dim() == 2 and index.size(1) == 0:
            _fail(op, f"index (rows, K) needs K >= 1 slot ids per row, got shape {list(index.shape)}")
    elif index.dim() == 2:
        _fail(
            op,
            f"index must be 1-D (rows,), got shape {list(index.shape)}; "
            f"only lora_linear takes (rows, K): call {op} once per column",
        )
    else:
        check_dim(op, "index", index, 1, "(rows,)")
    check_dtype(op, "index", index, torch.int64, "one slot id per row, -1 = no adapter")
    if index.size(0) != rows:
        _fail(
            op,
            f"index has {index.size(0)} entries but the batch has {rows} rows; "
            "give one slot id per row (-1 = no adapter)",
        )
    check_same_device(op, "index", index, x)
    check_contiguous(op, "index", index)
    if weight is not None:
        layout = "(rows, K), the shape of index" if index.dim() == 2 else "(rows,), the shape of index"
        check_dim(op, "weight", weight, index.dim(), layout)
        check_dtype(op, "weight", weight, torch.float32, "one float32 weight per index entry")
        check_size(op, "weight", weight, 0, index.size(0), "rows, = index.size(0)")
        if index.dim() == 2:
            check_size(op, "weight", weight, 1, index.size(1), "K, = index.size(1)")
        check_same_device(op, "weight", weight, x)
        check_contiguous(op, "weight", weight)
    if ranks is not None:
        check_dim(op, "ranks", ranks, 1, "(slots,)")
        check_dtype(op, "ranks", ranks, torch.int64, "the rank in use per slot")
        check_size(op, "ranks", ranks, 0, slots, "slots")
        check_same_device(op, "ranks", ranks, x)
        check_contiguous(op, "ranks", ranks)


def check_routing_values(op: str, index: torch.Tensor, ranks: torch.Tensor | None, slots: int, max_rank: int) -> None:
    """index (rows,) or (rows, K) in [-1, slots), ranks in [0, max_rank]; the first bad entry is named."""
    bad = ((index < -1) | (index >= slots)).nonzero()
    if bad.numel():
        at = bad[0].tolist()  # [row] or [row, column]
        where = f"row {at[0]}" if index.dim() == 1 else f"row {at[0]}, column {at[1]}"
        _fail(op, f"index values must be in [-1, {slots}) (slots = {slots}), got {int(index[tuple(at)])} at {where}")
    if ranks is not None:
        bad = ((ranks < 0) | (ranks > max_rank)).nonzero()
        if bad.numel():
            s = int(bad[0])
            _fail(op, f"ranks values must be in [0, max_rank = {max_rank}], got {int(ranks[s])} for slot {s}")


def check_shrink_args(op: str, x, A, index, ranks) -> None:
    """x (rows, in), A (slots, max_rank, in), index (rows,) int64, ranks (slots,) int64 or None."""
    check_floating(op, x)
    check_dim(op, "x", x, 2, "(rows, in)")
    check_dim(op, "A", A, 3, "(slots, max_rank, in)")
    check_size(op, "A", A, 2, x.size(1), "in features, = x.size(1)")
    check_dtype(op, "A", A, x.dtype, "the dtype of x")
    check_same_device(op, "A", A, x)
    check_contiguous(op, "x", x)
    check_contiguous(op, "A", A)
    check_routing(op, index, ranks, x.size(0), A.size(0), x)


def check_expand_args(op: str, y, t, B, scale, index, ranks, weight=None) -> None:
    """y (rows, out), t (rows, max_rank) fp32 (fp64 for fp64 y), B (slots, out, max_rank), scale (slots,) fp32,
    weight (rows,) fp32 or None."""
    check_floating(op, y)
    check_dim(op, "y", y, 2, "(rows, out)")
    check_dim(op, "B", B, 3, "(slots, out, max_rank)")
    check_size(op, "B", B, 1, y.size(1), "out features, = y.size(1)")
    check_dtype(op, "B", B, y.dtype, "the dtype of y")
    check_dim(op, "t", t, 2, "(rows, max_rank)")
    check_size(op, "t", t, 0, y.size(0), "rows, = y.size(0)")
    check_size(op, "t", t, 1, B.size(2), "max_rank, = B.size(2)")
    check_dtype(op, "t", t, intermediate_dtype(y.dtype), "the lora_shrink output for this dtype")
    check_dim(op, "scale", scale, 1, "(slots,)")
    check_size(op, "scale", scale, 0, B.size(0), "slots, = B.size(0)")
    check_dtype(op, "scale", scale, torch.float32, "one float32 scaling per slot")
    for name, tensor in (("t", t), ("B", B), ("scale", scale)):
        check_same_device(op, name, tensor, y)
    for name, tensor in (("y", y), ("t", t), ("B", B), ("scale", scale)):
        check_contiguous(op, name, tensor)
    check_routing(op, index, ranks, y.size(0), B.size(0), y, weight)


def check_delta_args(op: str, y, x, A, B, scale, index, ranks, weight=None) -> None:
    """y (rows, out), x (rows, in), A (slots, max_rank, in), B (slots, out, max_rank), scale (slots,) fp32,
    index (rows,) int64, weight (rows,) fp32 or None."""
    check_floating(op, x)
    check_dim(op, "x", x, 2, "(rows, in)")
    check_dim(op, "y", y, 2, "(rows, out)")
    check_size(op, "y", y, 0, x.size(0), "rows, = x.size(0)")
    check_dim(op, "A", A, 3, "(slots, max_rank, in)")
    check_size(op, "A", A, 2, x.size(1), "in features, = x.size(1)")
    check_dim(op, "B", B, 3, "(slots, out, max_rank)")
    check_size(op, "B", B, 0, A.size(0), "slots, = A.size(0)")
    check_size(op, "B", B, 1, y.size(1), "out features, = y.size(1)")
    check_size(op, "B", B, 2, A.size(1), "max_rank, = A.size(1)")
    for name, tensor in (("y", y), ("A", A), ("B", B)):
        check_dtype(op, name, tensor, x.dtype, "the dtype of x")
    check_dim(op, "scale", scale, 1, "(slots,)")
    check_size(op, "scale", scale, 0, A.size(0), "slots, = A.size(0)")
    check_dtype(op, "scale", scale, torch.float32, "one float32 scaling per slot")
    for name, tensor in (("y", y), ("A", A), ("B", B), ("scale", scale)):
        check_same_device(op, name, tensor, x)
    for name, tensor in (("x", x), ("y", y), ("A", A), ("B", B), ("scale", scale)):
        check_contiguous(op, name, tensor)
    check_routing(op, index, ranks, x.size(0), A.size(0), x, weight)


def check_linear_args(op: str, x, W, bias, A, B, scale, index, ranks, weight=None) -> None:
    """x (n0, ..., in), W (out, in), bias (out,) or None, A (slots, max_rank, in), B (slots, out, max_rank),
    index (n0,) or (n0, K), weight None or fp32 of index's shape."""
    check_floating(op, x)
    if x.dim() < 2:
        _fail(op, f"x must be (rows, in) or (batch, ..., in), got shape {list(x.shape)}")
    check_contiguous(op, "x", x)
    check_dim(op, "W", W, 2, "(out, in)")
    check_size(op, "W", W, 1, x.size(-1), "in features, = x.size(-1)")
    check_dtype(op, "W", W, x.dtype, "the dtype of x")
    check_same_device(op, "W", W, x)
    if bias is not None:
        check_dim(op, "bias", bias, 1, "(out,)")
        check_size(op, "bias", bias, 0, W.size(0), "out features, = W.size(0)")
        check_dtype(op, "bias", bias, x.dtype, "the dtype of x")
        check_same_device(op, "bias", bias, x)
    check_dim(op, "A", A, 3, "(slots, max_rank, in)")
    check_size(op, "A", A, 2, x.size(-1), "in features, = x.size(-1)")
    check_dim(op, "B", B, 3, "(slots, out, max_rank)")
    check_size(op, "B", B, 0, A.size(0), "slots, = A.size(0)")
    check_size(op, "B", B, 1, W.size(0), "out features, = W.size(0)")
    check_size(op, "B", B, 2, A.size(1), "max_rank, = A.size(1)")
    check_dtype(op, "A", A, x.dtype, "the dtype of x")
    check_dtype(op, "B", B, x.dtype, "the dtype of x")
    check_dim(op, "scale", scale, 1, "(slots,)")
    check_size(op, "scale", scale, 0, A.size(0), "slots, = A.size(0)")
    check_dtype(op, "scale", scale, torch.float32, "one float32 scaling per slot")
    for name, tensor in (("A", A), ("B", B), ("scale", scale)):
        check_same_device(op, name, tensor, x)
        check_contiguous(op, name, tensor)
    check_routing(op, index, ranks, x.size(0), A.size(0), x, weight, columns=True)


def check_backward_args(op: str, grad_y, x, W) -> None:
    """grad_y (rows, out) and x (rows, in) of lora_linear_backward, on top of check_linear_args."""
    check_dim(op, "x", x, 2, "(rows, in)")
    check_dim(op, "grad_y", grad_y, 2, "(rows, out)")
    check_size(op, "grad_y", grad_y, 0, x.size(0), "rows, = x.size(0)")
    check_size(op, "grad_y", grad_y, 1, W.size(0), "out features, = W.size(0)")
    check_dtype(op, "grad_y", grad_y, x.dtype, "the dtype of x")
    check_same_device(op, "grad_y", grad_y, x)
    check_contiguous(op, "grad_y", grad_y)
