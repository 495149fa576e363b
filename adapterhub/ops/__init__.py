"""The gathered low-rank ops (Punica's BGMV/SGMV idea) that every adapted layer calls.

    y[i] = x[i] @ W.T + bias + sum_k w[i, k] * scale[s] * (x[i] @ A[s, :r].T) @ B[s, :, :r].T
    s = index[i, k] (-1: nothing for that k), r = ranks[s] (default: max_rank), w = weight (default 1)
    A (slots, max_rank, in), B (slots, out, max_rank), scale (slots,) fp32, index int64,
    weight fp32 of index's shape; index is (rows,) (K = 1), or (rows, K) for lora_linear only

Compiled kernels (adapterhub._C) when built, else the pure-PyTorch reference with the
same results; `backend()` says which.
"""

from __future__ import annotations

import torch

from .loader import load_backend

_BACKEND = load_backend()
from . import meta  # noqa: E402,F401  (fake kernels and autograd, registered on the ops just defined)


def backend() -> str:
    """ "compiled" when adapterhub._C runs the ops, "fallback" for the pure-PyTorch reference."""
    return _BACKEND


def lora_shrink(
    x: torch.Tensor, A: torch.Tensor, index: torch.Tensor, ranks: torch.Tensor | None = None
) -> torch.Tensor:
    """t (rows, max_rank) = x (rows, in) @ A[index].T per row, fp32 (fp64 for fp64 x); rows with -1 get 0."""
    return torch.ops.adapterhub.lora_shrink(x, A, index, ranks)


def lora_expand(
    y: torch.Tensor,
    t: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    index: torch.Tensor,
    ranks: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> None:
    """y (rows, out) += weight * scale[index] * t (rows, max_rank) @ B[index].T per row, in place; -1 rows untouched.

    weight (rows,) fp32 (None: 1) weighs each row's delta, for adapters composed per request.
    """
    torch.ops.adapterhub.lora_expand(y, t, B, scale, index, ranks, weight)


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
    """y (rows, out) += weight * scale[s] * (x (rows, in) @ A[s].T) @ B[s].T per row, in place; -1 rows untouched.

    lora_shrink then lora_expand in one op, so a device can fuse them (CUDA: one grouping of the rows
    for both launches, or, on sm_90+ with `_C.set_cuda_decode("fused")`, one launch for decode batches).
    What an adapted layer calls to add its adapters' deltas to the base output.
    """
    torch.ops.adapterhub.lora_delta(y, x, A, B, scale, index, ranks, weight)


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
    """x (n0, ..., in) -> (n0, ..., out): base linear plus the low-rank delta of slot index[i] for all of x[i].

    index (n0, K) composes K adapters per row (-1 pads a column), each delta times weight[i, k]
    (weight fp32 of index's shape; None: 1). Differentiable in x, W, bias, A and B, not weight.
    For per-token routing flatten x to (tokens, in).
    """
    return torch.ops.adapterhub.lora_linear(x, W, bias, A, B, scale, index, ranks, weight)


def check_routing_errors() -> None:
    """Raises the ValueError for an out-of-range index or ranks value a CUDA op met, if any.

    CUDA ops check routing values on the device, without a host sync: the row with such a value
    runs as "no adapter" and the error is raised by the next adapterhub op on that device. This
    waits for every device the ops ran on and raises it now; while this thread captures a CUDA
    graph it does nothing. CPU and fallback ops raise at the call itself, so there this only
    returns.

    >>> from adapterhub import ops
    >>> ops.check_routing_errors()  # nothing pending
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized() or _BACKEND != "compiled":
        return
    from .. import _C

    if getattr(_C, "with_cuda", False) and not torch.cuda.is_current_stream_capturing():
        _C.raise_routing_errors()  # waits for each device the ops ran on first


__all__ = ["backend", "check_routing_errors", "lora_delta", "lora_expand", "lora_linear", "lora_shrink"]
