"""Pure-PyTorch reference of the gathered low-rank ops: the fallback when the compiled
extension is absent, and the oracle the compiled kernels are tested against.

Same signatures and the same contract as the compiled ops:
    t[i]  = x[i] @ A[s, :r].T                          (rows, max_rank), fp32 (fp64 for fp64)
    y[i] += scale[s] * t[i, :r] @ B[s, :, :r].T         in place
    s = index[i] (-1: no adapter, t[i] = 0, y[i] unchanged), r = ranks[s] (default max_rank)
Rows are grouped per slot, as PEFT does for mixed batches: one pair of matmuls per slot.
"""

from __future__ import annotations

import torch

from .checks import (
    check_backward_args,
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
) -> None:
    """y (rows, out) += scale[s] * t (rows, max_rank) @ B[s].T, B (slots, out, max_rank); in place."""
    check_expand_args("lora_expand", y, t, B, scale, index, ranks)
    check_routing_values("lora_expand", index, ranks, B.size(0), B.size(2))
    for s, r, rows in _segments(index, ranks, B.size(2)):
        delta = t[rows, :r] @ B[s, :, :r].to(t.dtype).T  # (n, out)
        y[rows] = (y[rows].to(t.dtype) + float(scale[s]) * delta).to(y.dtype)


def index_per_row(index: torch.Tensor, rows: int) -> torch.Tensor:
    """index (n0,) -> (rows,) for x (n0, ..., in) flattened to (rows, in): entry i routes all of x[i]."""
    n0 = index.size(0)
    return index if n0 in (rows, 0) else index.repeat_interleave(rows // n0)


def lora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    index: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (n0, ..., in) -> y (n0, ..., out): the base linear plus each row's low-rank delta."""
    check_linear_args("lora_linear", x, W, bias, A, B, scale, index, ranks)
    check_routing_values("lora_linear", index, ranks, A.size(0), A.size(1))
    x2 = x.reshape(-1, x.size(-1))  # (rows, in)
    y = torch.nn.functional.linear(x2, W, bias)  # (rows, out)
    idx = index_per_row(index, x2.size(0))
    lora_expand(y, lora_shrink(x2, A, idx, ranks), B, scale, idx, ranks)
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
):
    """grad_y (rows, out), x (rows, in) -> grad_x (rows, in) with the base term, grad_A like A, grad_B like B."""
    check_backward_args("lora_linear_backward", grad_y, x, W)
    check_linear_args("lora_linear_backward", x, W, None, A, B, scale, index, ranks)
    check_routing_values("lora_linear_backward", index, ranks, A.size(0), A.size(1))
    acc = intermediate_dtype(x.dtype)
    grad_x = grad_y @ W
    grad_A, grad_B = torch.zeros_like(A), torch.zeros_like(B)
    for s, r, rows in _segments(index, ranks, A.size(1)):
        sc = float(scale[s])
        xs, gs = x[rows].to(acc), grad_y[rows].to(acc)  # (n, in), (n, out)
        As, Bs = A[s, :r].to(acc), B[s, :, :r].to(acc)  # (r, in), (out, r)
        ts, us = xs @ As.T, gs @ Bs  # (n, r), (n, r)
        grad_x.index_add_(0, rows, (sc * (us @ As)).to(grad_x.dtype))
        grad_B[s, :, :r] = sc * (gs.T @ ts)
        grad_A[s, :r] = sc * (us.T @ xs)
    return grad_x, grad_A, grad_B
