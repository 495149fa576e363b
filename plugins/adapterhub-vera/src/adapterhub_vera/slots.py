"""VeRA slots on the gathered low-rank ops: VeRA's delta is a low-rank product, so it runs as a LoRA
of rank r (scale 1) in the same batch as every other low-rank adapter:

    y += lambda_b * (B @ (lambda_d * (A @ x)))        A = vera_A[:, :in] (r, in), B = vera_B[:out] (out, r)
       = B_eff @ (A_eff @ x)                          A_eff = lambda_d[:, None] * A,  B_eff = lambda_b[:, None] * B
"""

from __future__ import annotations

import torch
from torch import nn

from adapterhub import LowRankSlots

SHARED = ("vera_A", "vera_B")


class VeraSlots(LowRankSlots):
    """LowRankSlots holding each slot's A_eff, B_eff for the forward. The tensors as written stay on
    the host, so that `read` gives back the adapter exactly in any model dtype, and the shared
    projections are held once per adapter instead of once per module on the device."""

    def __init__(self, base: nn.Module, slots: int, max_rank: int):
        super().__init__(base, slots, max_rank)
        self.written: list[dict[str, torch.Tensor] | None] = [None] * slots  # per slot: lambdas and projections

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        if tensors is None:
            self.written[slot] = None
            self.write_low_rank(slot, None, None)
            return
        # The products in at least fp32 on the slots' device; write_low_rank casts them to the model's dtype.
        kw = dict(device=self.A.device, dtype=torch.promote_types(tensors["vera_A"].dtype, torch.float32))
        A = tensors["vera_A"][:, : self.in_features].to(**kw)  # (r, in)
        B = tensors["vera_B"][: self.out_features].to(**kw)  # (out, r)
        lambda_d = tensors["vera_lambda_d"].to(**kw)  # (r,)
        lambda_b = tensors["vera_lambda_b"].to(**kw)  # (out,)
        self.write_low_rank(slot, lambda_d[:, None] * A, lambda_b[:, None] * B, 1.0)
        # Lambdas copied (a trainer may update its tensors in place); the projections are frozen: kept by reference.
        self.written[slot] = {name: t if name in SHARED else t.detach().clone() for name, t in tensors.items()}

    def read(self, slot: int) -> dict[str, torch.Tensor] | None:
        """Copies of the lambdas; the projections themselves: never written in place, and shared by every
        module of the adapter, so that a copy per module would multiply them in the host cache."""
        written = self.written[slot]
        if written is None:
            return None
        return {name: t if name in SHARED else t.clone() for name, t in written.items()}
