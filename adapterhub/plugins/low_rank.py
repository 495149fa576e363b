"""Slots for any type whose effect on a Linear is a low-rank delta, computed with the gathered ops:

    y[i] += scale[s] * (x[i] @ A[s, :r].T) @ B[s, :, :r].T      s = slot of row i (-1: none), r = ranks[s]

A row of a "cat" composition names K (slot, weight) pairs and adds the weighted sum of their deltas,
so these slots take every composition method of the low-rank family on the fly.

LoRA uses it directly; a plugin type that can express its delta as some A (r, in) and B (out, r)
(VeRA: scaled shared projections; LoHa: the Hadamard product of two low-rank pairs as one pair of
rank r1*r2) subclasses it, converting in `write`/`read` and calling `write_low_rank`/`read_low_rank`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..formats.targets import linear_weight
from ..ops.reference import columns
from .contract import ModuleSlots, Route


class _LowRankDelta(torch.autograd.Function):
    """base (rows, out) + the gathered delta of x (rows, in), differentiable: the forward runs the
    inference ops, the backward the op contract's lora_linear_backward, whose grad_x already holds
    the base term grad @ W. So the base output enters detached and its own graph is never walked."""

    @staticmethod
    def forward(ctx, x2, base2, W, bias, A, B, scale, route, ranks):
        index, weight = route  # (rows,) and None, or (rows, K) both: several (slot, weight) pairs per row
        y = base2.detach().clone()  # (rows, out)
        _add_columns(y, x2, A, B, scale, columns(index, weight), ranks)
        ctx.save_for_backward(x2, W, A, B, scale, index, ranks, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x2, W, A, B, scale, index, ranks, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (rows, out)
        grad_x, grad_A, grad_B = torch.ops.adapterhub.lora_linear_backward(
            grad, x2, W.detach(), A.detach(), B.detach(), scale, index, ranks, weight
        )
        need = ctx.needs_input_grad
        grad_W = grad.T @ x2 if need[2] else None  # (out, in)
        grad_bias = grad.sum(0) if need[3] and ctx.has_bias else None
        return (
            grad_x,
            None,
            grad_W,
            grad_bias,
            grad_A if need[4] else None,
            grad_B if need[5] else None,
            None,
            None,
            None,
        )


def _add_columns(y, x2, A, B, scale, pairs, ranks) -> None:
    """y (rows, out) += each row's delta, one shrink/expand per column of (slot (rows,), weight (rows,)
    or None) pairs: one column for plain rows, K for a "cat" composition's."""
    for index, weight in pairs:
        ops.lora_delta(y, x2, A, B, scale, index, ranks, weight)


class LowRankSlots(ModuleSlots):
    """Preallocated A (slots, max_rank, in), B (slots, out, max_rank), scale and rank per slot of one
    Linear/Conv1D; writes go in place, shapes never change."""

    def __init__(self, base: nn.Module, slots: int, max_rank: int):
        super().__init__()
        weight = linear_weight(base)  # (out, in)
        out_features, in_features = weight.shape
        kw = dict(device=weight.device)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("A", torch.zeros(slots, max_rank, in_features, dtype=weight.dtype, **kw), persistent=False)
        self.register_buffer(
            "B", torch.zeros(slots, out_features, max_rank, dtype=weight.dtype, **kw), persistent=False
        )
        self.register_buffer("scale", torch.zeros(slots, dtype=torch.float32, **kw), persistent=False)
        self.register_buffer("ranks", torch.zeros(slots, dtype=torch.int64, **kw), persistent=False)

    def write_low_rank(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float = 1.0) -> None:
        """A (r, in), B (out, r) into `slot` (None: no delta). Only the first r ranks are written:
        the kernels never read past `ranks[slot]`."""
        buffers = self._buffers  # direct access: this runs for every target module on every load
        r = 0 if A is None else A.size(0)
        if r:
            buffers["A"][slot, :r].copy_(A)
            buffers["B"][slot, :, :r].copy_(B)
        buffers["scale"][slot : slot + 1].fill_(scale if r else 0.0)
        buffers["ranks"][slot : slot + 1].fill_(r)

    def read_low_rank(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A (r, in), B (out, r), scale) copied out of `slot`, or None."""
        r = int(self.ranks[slot])
        if r == 0:
            return None
        return self.A[slot, :r].clone(), self.B[slot, :, :r].clone(), float(self.scale[slot])

    def add_delta(
        self, x: torch.Tensor, output: torch.Tensor, route: Route, base: nn.Module | None = None
    ) -> torch.Tensor:
        """output (n0, ..., out) + each row's delta of x (n0, ..., in): in place, or, when autograd
        records (training), as a new tensor whose gradients reach x, A, B and `base`'s weights."""
        x2 = x.reshape(-1, self.in_features).contiguous()  # (rows, in)
        y2 = output.view(-1, self.out_features)  # (rows, out)
        n0, rows = x.size(0), x2.size(0)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x2, y2, self.A, self.B)):
            if base is None:
                raise RuntimeError("add_delta: pass the adapted module as `base` to compute gradients")
            bias = getattr(base, "bias", None)
            route_rows = (route.rows(n0, rows, x.device), route.weights(n0, rows, x.device))
            y = _LowRankDelta.apply(
                x2, y2, linear_weight(base), bias, self.A, self.B, self.scale, route_rows, self.ranks
            )
            return y.view_as(output)
        _add_columns(y2, x2, self.A, self.B, self.scale, route.pairs(n0, rows, x.device), self.ranks)
        return output

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor, route: Route) -> torch.Tensor:
        return self.add_delta(args[0], output, route, module)
