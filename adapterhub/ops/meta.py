"""Fake (meta) kernels for torch.compile and the autograd formula of lora_linear.

Registered for whichever backend defined the ops; shapes follow the op contract:
    lora_shrink: x (rows, in), A (slots, R, in)                 -> t (rows, R) fp32 (fp64 for fp64)
    lora_expand: y (rows, out) += ..., B (slots, out, R)       -> None, y mutated
    lora_delta:  y (rows, out) += delta of x (rows, in)        -> None, y mutated
    lora_linear: x (n0, ..., in), W (out, in), index (n0,) or (n0, K) -> y (n0, ..., out)
"""

from __future__ import annotations

import torch

from .checks import (
    check_backward_args,
    check_delta_args,
    check_expand_args,
    check_linear_args,
    check_shrink_args,
    intermediate_dtype,
)
from .reference import index_per_row


@torch.library.register_fake("adapterhub::lora_shrink")
def _shrink_fake(x, A, index, ranks=None):
    check_shrink_args("lora_shrink", x, A, index, ranks)
    return x.new_empty((x.size(0), A.size(1)), dtype=intermediate_dtype(x.dtype))


@torch.library.register_fake("adapterhub::lora_expand")
def _expand_fake(y, t, B, scale, index, ranks=None, weight=None):
    check_expand_args("lora_expand", y, t, B, scale, index, ranks, weight)


@torch.library.register_fake("adapterhub::lora_delta")
def _delta_fake(y, x, A, B, scale, index, ranks=None, weight=None):
    check_delta_args("lora_delta", y, x, A, B, scale, index, ranks, weight)


@torch.library.register_fake("adapterhub::lora_linear")
def _linear_fake(x, W, bias, A, B, scale, index, ranks=None, weight=None):
    check_linear_args("lora_linear", x, W, bias, A, B, scale, index, ranks, weight)
    return x.new_empty((*x.shape[:-1], W.size(0)))


@torch.library.register_fake("adapterhub::lora_linear_backward")
def _linear_backward_fake(grad_y, x, W, A, B, scale, index, ranks=None, weight=None):
    check_backward_args("lora_linear_backward", grad_y, x, W)
    check_linear_args("lora_linear_backward", x, W, None, A, B, scale, index, ranks, weight)
    return torch.empty_like(x), torch.empty_like(A), torch.empty_like(B)


def _setup_context(ctx, inputs, output):
    x, W, bias, A, B, scale, index, ranks, weight = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, W, A, B, scale, index, ranks, weight)


def _linear_backward(ctx, grad_y):
    """Gradients for x, W, bias, A and B; none for scale, index, ranks and weight."""
    x, W, A, B, scale, index, ranks, weight = ctx.saved_tensors
    need_x, need_W, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    x2 = x.reshape(-1, x.size(-1))  # (rows, in)
    g2 = grad_y.reshape(-1, grad_y.size(-1)).contiguous()  # (rows, out)
    idx = index_per_row(index, x2.size(0))  # (rows,) or (rows, K)
    w = None if weight is None else index_per_row(weight, x2.size(0))
    grad_x, grad_A, grad_B = torch.ops.adapterhub.lora_linear_backward(g2, x2, W, A, B, scale, idx, ranks, w)
    return (
        grad_x.view_as(x) if need_x else None,
        g2.T @ x2 if need_W else None,
        g2.sum(0) if need_bias and ctx.has_bias else None,
        grad_A if need_A else None,
        grad_B if need_B else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("adapterhub::lora_linear", _linear_backward, setup_context=_setup_context)
