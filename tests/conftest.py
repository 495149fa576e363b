"""Shared helpers of the op tests: a float64 oracle written as the plainest per-row loop
(independent of the slot grouping in adapterhub/ops/reference.py) and random inputs.

    t[i]  = x[i] @ A[s, :r].T                      s = index[i] (-1: no adapter), r = ranks[s]
    y[i] += scale[s] * t[i, :r] @ B[s, :, :r].T

Test modules import these with `from conftest import ...`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import adapterhub

# dtype -> (rtol, atol) of a result against the float64 oracle, for O(1) values.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 3e-2),
}


def pytest_report_header(config):
    return f"adapterhub backend: {adapterhub.backend()}"


def _rank(ranks, s: int, max_rank: int) -> int:
    return max_rank if ranks is None else int(ranks[s])


def oracle_shrink(x, A, index, ranks=None):
    """x (rows, in), A (slots, R, in) -> t (rows, R) float64, one row at a time."""
    t = torch.zeros(x.size(0), A.size(1), dtype=torch.float64)
    for i in range(x.size(0)):
        s = int(index[i])
        if s == -1:
            continue
        r = _rank(ranks, s, A.size(1))
        t[i, :r] = x[i].double() @ A[s, :r].double().T
    return t


def oracle_expand(y, t, B, scale, index, ranks=None, weight=None):
    """Returns y (rows, out) float64 + weight[i] * scale[s] * t[i, :r] @ B[s, :, :r].T per row (weight
    None: 1; y is not touched)."""
    out = y.double().clone()
    for i in range(y.size(0)):
        s = int(index[i])
        if s == -1:
            continue
        r = _rank(ranks, s, B.size(2))
        w = 1.0 if weight is None else float(weight[i])
        out[i] += w * float(scale[s]) * (t[i, :r].double() @ B[s, :, :r].double().T)
    return out


def oracle_linear(x, W, bias, A, B, scale, index, ranks=None, weight=None):
    """x (n0, ..., in), index (n0,) or (n0, K) -> (n0, ..., out) float64; entry i of index routes all
    of x[i]: base + sum_k weight[i, k] * scale[s] * (x[i] @ A[s, :r].T) @ B[s, :, :r].T, s = index[i, k]
    (weight None: 1).

    Differentiable: for float64 leaves, autograd through this loop gives the true gradients.
    """
    idx = index if index.dim() == 2 else index[:, None]  # (n0, K)
    w = None if weight is None else weight.reshape(idx.shape)
    rows = []
    for i in range(x.size(0)):
        xi = x[i].double()  # (..., in)
        yi = xi @ W.double().T
        if bias is not None:
            yi = yi + bias.double()
        for k in range(idx.size(1)):
            s = int(idx[i, k])
            if s == -1:
                continue
            r = _rank(ranks, s, A.size(1))
            wk = 1.0 if w is None else float(w[i, k])
            yi = yi + wk * float(scale[s]) * ((xi @ A[s, :r].double().T) @ B[s, :, :r].double().T)
        rows.append(yi)
    if not rows:
        return torch.zeros(*x.shape[:-1], W.size(0), dtype=torch.float64)
    return torch.stack(rows)


@dataclass
class Case:
    """Inputs of the three ops for one batch: x (rows, in) or (n0, T, in), slots with per-slot ranks."""

    x: torch.Tensor
    W: torch.Tensor
    bias: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor
    index: torch.Tensor
    ranks: torch.Tensor | None
    y: torch.Tensor  # (rows, out), a starting y for lora_expand
    t: torch.Tensor  # (rows, R), a t for lora_expand: NaN wherever lora_expand must not read

    @property
    def linear_args(self):
        return self.x, self.W, self.bias, self.A, self.B, self.scale, self.index, self.ranks


def make_case(
    index,
    slots: int,
    max_rank: int,
    in_f: int,
    out_f: int,
    dtype=torch.float32,
    ranks=None,
    padding=float("nan"),
    seed: int = 0,
    tokens: int | None = None,
) -> Case:
    """Random inputs with O(1) outputs. index: list or LongTensor of slot ids (-1 = none).

    With ranks, the padding A[s, r:] and B[s, :, r:] is filled with `padding` (NaN by default:
    any read of it shows in the result); without, A and B are dense up to max_rank.
    tokens: x is (len(index), tokens, in) instead of (len(index), in).
    """
    g = torch.Generator().manual_seed(seed)
    index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
    ranks = None if ranks is None else torch.as_tensor(ranks, dtype=torch.int64)
    n0 = index.numel()
    lead = (n0,) if tokens is None else (n0, tokens)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    A = randn(slots, max_rank, in_f, std=1 / math.sqrt(in_f))
    B = randn(slots, out_f, max_rank, std=1 / math.sqrt(max(max_rank, 1)))
    t = torch.randn(n0, max_rank, generator=g, dtype=torch.float64)
    if ranks is not None:
        for s in range(slots):
            A[s, int(ranks[s]) :] = padding
            B[s, :, int(ranks[s]) :] = padding
    for i in range(n0):
        s = int(index[i])
        t[i, _rank(ranks, s, max_rank) if s >= 0 else 0 :] = float("nan")
    return Case(
        x=randn(*lead, in_f),
        W=randn(out_f, in_f, std=1 / math.sqrt(in_f)),
        bias=randn(out_f),
        A=A,
        B=B,
        scale=(torch.rand(slots, generator=g) * 1.5 + 0.25),
        index=index,
        ranks=ranks,
        y=randn(n0, out_f),
        t=t.to(torch.float64 if dtype == torch.float64 else torch.float32),
    )


def assert_close(got, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=False)
