"""LoHa slots on the gathered low-rank ops: the Hadamard product of two rank-r products is one
product of rank r*r, so LoHa runs as a LoRA of rank r*r without ever forming delta_W.

    delta_W = scale * (w1a @ w1b) * (w2a @ w2b)      w1a, w2a (out, r); w1b, w2b (r, in)
            = scale * B' @ A'                        A' (r*r, in):  row i*r+j    = w1b[i] * w2b[j]
                                                     B' (out, r*r): column i*r+j = w1a[:, i] * w2a[:, j]

since (B' @ A')[o, c] = sum_ij w1a[o,i] w2a[o,j] w1b[i,c] w2b[j,c] = (w1a @ w1b)[o,c] * (w2a @ w2b)[o,c].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adapterhub import LowRankSlots

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def hadamard_low_rank(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' (r1*r2, in), B' (out, r1*r2)) with B' @ A' = (w1a @ w1b) * (w2a @ w2b), exactly in real arithmetic."""
    r1, r2 = w1b.size(0), w2b.size(0)
    A = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, w1b.size(1))  # (r1*r2, in)
    B = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.size(0), r1 * r2)  # (out, r1*r2)
    return A, B


class LohaSlots(LowRankSlots):
    """LowRankSlots holding each slot's A', B' (rank r*r) for the forward, plus the four factors
    and the exact scale as written, so that `read` gives back the adapter itself (save, eviction)."""

    def __init__(self, base: nn.Module, slots: int, max_rank: int):
        super().__init__(base, slots, max_rank)
        r = math.isqrt(max_rank)  # the largest factor rank whose r*r fits a slot
        kw = dict(device=self.A.device, dtype=self.A.dtype)
        shapes = {
            "hada_w1_a": (self.out_features, r),
            "hada_w1_b": (r, self.in_features),
            "hada_w2_a": (self.out_features, r),
            "hada_w2_b": (r, self.in_features),
        }
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(slots, *shape, **kw), persistent=False)
        self.exact_scale = [0.0] * slots  # alpha / r in fp64: the fp32 `scale` buffer would round it

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        if tensors is None:
            self.write_low_rank(slot, None, None)
            return
        r = tensors["hada_w1_b"].size(0)
        for name in FACTORS:
            view = self._buffers[name][slot]  # (out, r_max) or (r_max, in)
            (view[:, :r] if name.endswith("_a") else view[:r]).copy_(tensors[name])
        # The product in at least fp32 on the slots' device; write_low_rank casts it to the model's dtype.
        dtype = torch.promote_types(tensors["hada_w1_a"].dtype, torch.float32)
        A, B = hadamard_low_rank(*(tensors[name].to(self.A.device, dtype) for name in FACTORS))
        self.exact_scale[slot] = float(tensors["scale"])
        self.write_low_rank(slot, A, B, self.exact_scale[slot])

    def read(self, slot: int) -> dict[str, torch.Tensor] | None:
        r2 = int(self.ranks[slot])
        if r2 == 0:
            return None
        r = math.isqrt(r2)  # write stored r*r
        tensors = {
            name: (self._buffers[name][slot][:, :r] if name.endswith("_a") else self._buffers[name][slot][:r]).clone()
            for name in FACTORS
        }
        return {**tensors, "scale": torch.tensor(self.exact_scale[slot], dtype=torch.float64)}
