"""Pure-PyTorch reference of the gathered low-rank ops: the fallback when the compiled
extension is absent, and the oracle the compiled kernels are tested against.

Same signatures and the same contract as the compiled ops:
    t[i]  = x[i] @ A[s, :r].T                          (rows, max_rank), fp32 (fp64 for fp64)
    y[i] += w[i] * scale[s] * t[i, :r] @ B[s, :, :r].T  in place; w = weight[i] (default 1)
    s = index[i] (-1: no adapter, t[i] = 0, y[i] unchanged), r = ranks[s] (default max_rank)
lora_linear takes index (n0, K) too: K (slot, weight) pairs per row, one shrink/expand per column.
Rows are grouped per slot, as PEFT does for mixed batches: one pair of matmuls per slot.
"""

from __future__ import annotations

import torch

from .checks import (
    check_backward_args,
    check_delta_args,
    check_expand_args,
    check_linear_args,
    check_routing_values,
    check_shrink_args,
    intermediate_dtype,
)


def _segments(index: torch.Tensor, ranks: torch.Tensor | None, max_rank: int):
    """Yields (slot, rank, rows) for each slot in use; rows is a LongTensor of row ids."""
    for s in torch.unique(index[index >= 0]).tolist():
        r = max_rank if ranks is None else int(ranks[s])
        if r > 0:
            yield s, r, (index == s).nonzero().flatten()


def lora_shrink(
    x: torch.Tensor, A: torch.Tensor, index: torch.Tensor, ranks: torch.Tensor | None = None
) -> torch.Tensor:
    """x (rows, in), A (slots, max_rank, in) -> t (rows, max_rank)."""
    check_shrink_args("lora_shrink", x, A, index, ranks)
    check_routing_values("lora_shrink", index, ranks, A.size(0), A.size(1))
    return _shrink(x, A, index, ranks)


def _shrink(x: torch.Tensor, A: torch.Tensor, index: torch.Tensor, ranks: torch.Tensor | None) -> torch.Tensor:
    """lora_shrink on checked arguments."""
    acc = intermediate_dtype(x.dtype)
    t = torch.zeros(x.size(0), A.size(1), dtype=acc, device=x.device)
    for s, r, rows in _segments(index, ranks, A.size(1)):
        t[rows, :r] = x[rows].to(acc) @ A[s, :r].to(acc).T  # (n, r)
    return t


def lora_expand(
    y: torch.Tensor,
    t: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    index: torch.Tensor,
    ranks: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> None:
    """y (rows, out) += weight * scale[s] * t (rows, max_rank) @ B[s].T, B (slots, out, max_rank); in place.

    weight (rows,) fp32 scales t in its own dtype, so weight = 1 gives the bits of weight = None.
    """
    check_expand_args("lora_expand", y, t, B, scale, index, ranks, weight)
    check_routing_values("lora_expand", index, ranks, B.size(0), B.size(2))
    _expand(y, t, B, scale, index, ranks, weight)


def _expand(y, t, B, scale, index, ranks, weight) -> None:
    """lora_expand on checked arguments."""
    for s, r, rows in _segments(index, ranks, B.size(2)):
        ts = t[rows, :r] if weight is None else t[rows, :r] * weight[rows, None].to(t.dtype)  # (n, r)
        delta = ts @ B[s, :, :r].to(t.dtype).T  # (n, out)
        y[rows] = (y[rows].to(t.dtype) + float(scale[s]) * delta).to(y.dtype)


def lora_delta(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    index: torch.Tensor,
    ranks: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> None:
    """y (rows, out) += weight * scale[s] * (x (rows, in) @ A[s, :r].T) @ B[s, :, :r].T per row; in place."""
    check_delta_args("lora_delta", y, x, A, B, scale, index, ranks, weight)
    check_routing_values("lora_delta", index, ranks, A.size(0), A.size(1))
    _delta(y, x, A, B, scale, index, ranks, weight)


def _delta(y, x, A, B, scale, index, ranks, weight) -> None:
    """lora_delta on checked arguments (each op checks once, not again per shrink and expand)."""
    _expand(y, _shrink(x, A, index, ranks), B, scale, index, ranks, weight)


def index_per_row(index: torch.Tensor, rows: int) -> torch.Tensor:
    """index or weight (n0,) or (n0, K) -> (rows,) or (rows, K) for x (n0, ..., in) flattened to (rows, in):
    entry i routes all of x[i]."""
    n0 = index.size(0)
    return index if n0 in (rows, 0) else index.repeat_interleave(rows // n0, dim=0)


def columns(index: torch.Tensor, weight: torch.Tensor | None):
    """Yields (index, weight) per column of a (rows, K) index, each (rows,) and contiguous; a 1-D index is one."""
    if index.dim() == 1:
        yield index, weight
        return
    for k in range(index.size(1)):
        yield index[:, k].contiguous(), None if weight is None else weight[:, k].contiguous()


def lora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    index: torch.Tensor,
    ranks: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (n0, ..., in) -> y (n0, ..., out): the base linear plus each row's weighted low-rank deltas,
    one shrink/expand pair per column of index (n0,) or (n0, K)."""
    check_linear_args("lora_linear", x, W, bias, A, B, scale, index, ranks, weight)
    check_routing_values("lora_linear", index, ranks, A.size(0), A.size(1))
    x2 = x.reshape(-1, x.size(-1))  # (rows, in)
    y = torch.nn.functional.linear(x2, W, bias)  # (rows, out)
    idx = index_per_row(index, x2.size(0))  # (rows,) or (rows, K)
    w = None if weight is None else index_per_row(weight, x2.size(0))
    for idx_k, w_k in columns(idx, w):
        _delta(y, x2, A, B, scale, idx_k, ranks, w_k)
    return y.view(*x.shape[:-1], W.size(0))


def lora_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    index: torch.Tensor,
    ranks: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
):
    """grad_y (rows, out), x (rows, in), index (rows,) or (rows, K) -> grad_x (rows, in) with the base term,
    grad_A like A, grad_B like B, summed over columns (a slot may recur across rows and columns)."""
    check_backward_args("lora_linear_backward", grad_y, x, W)
    check_linear_args("lora_linear_backward", x, W, None, A, B, scale, index, ranks, weight)
    check_routing_values("lora_linear_backward", index, ranks, A.size(0), A.size(1))
    acc = intermediate_dtype(x.dtype)
    grad_x = grad_y @ W
    grad_A = torch.zeros(A.shape, dtype=acc, device=A.device)  # summed in acc, rounded once at the end
    grad_B = torch.zeros(B.shape, dtype=acc, device=B.device)
    for idx, w in columns(index, weight):
        for s, r, rows in _segments(idx, ranks, A.size(1)):
            sc = float(scale[s])
            xs, gs = x[rows].to(acc), grad_y[rows].to(acc)  # (n, in), (n, out)
            As, Bs = A[s, :r].to(acc), B[s, :, :r].to(acc)  # (r, in), (out, r)
            ts, us = xs @ As.T, gs @ Bs  # (n, r), (n, r)
            if w is not None:  # the row's weight scales both paths through its delta
                ws = w[rows, None].to(acc)  # (n, 1)
                ts, us = ts * ws, us * ws
            grad_x.index_add_(0, rows, (sc * (us @ As)).to(grad_x.dtype))
            grad_B[s, :, :r] += sc * (gs.T @ ts)
            grad_A[s, :r] += sc * (us.T @ xs)
    return grad_x, grad_A.to(A.dtype), grad_B.to(B.dtype)
