"""Per-slot full copies of one small nn.Linear (PEFT's modules_to_save, e.g. a classifier), for any
adapter type: the slot tensors of a head. Each row's copy is gathered, with no Python branch on
which slots hold one, so a compiled model does not recompile as adapters with heads come and go."""

from __future__ import annotations

import torch
from torch import nn

from ..plugins.contract import ModuleSlots, Route


class HeadSlots(ModuleSlots):
    """weight (slots, out, in), bias (slots, out) and whether each slot holds a copy; rows whose slot
    holds none (the base, adapters without this head) keep the module's own output."""

    MAX_PARAMETERS = 1 << 22  # a classifier or score head; not lm_head or embeddings

    def __init__(self, base: nn.Linear, slots: int):
        super().__init__()
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.register_buffer("weight", torch.zeros(slots, *base.weight.shape, **kw), persistent=False)
        self.register_buffer("bias", torch.zeros(slots, base.weight.size(0), **kw), persistent=False)
        self.register_buffer("present", torch.zeros(slots, dtype=torch.bool, device=kw["device"]), persistent=False)
        self.has_bias = base.bias is not None

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        self.present[slot] = tensors is not None
        if tensors is not None:
            self.weight[slot].copy_(tensors["weight"])
            if self.has_bias:
                self.bias[slot].copy_(tensors["bias"])

    def read(self, slot: int) -> dict[str, torch.Tensor] | None:
        if not self.present[slot]:
            return None
        tensors = {"weight": self.weight[slot].clone()}
        if self.has_bias:
            tensors["bias"] = self.bias[slot].clone()
        return tensors

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor, route: Route) -> torch.Tensor:
        x = args[0]  # (n0, ..., in)
        if route.packed:  # one row per token: (T, in)
            x, output = x.reshape(-1, x.size(-1)), output.reshape(-1, output.size(-1))
            return self._rows(x, output, route.rows(1, x.size(0), x.device)).view(*args[0].shape[:-1], -1)
        return self._rows(x, output, route.rows(x.size(0), x.size(0), x.device))

    def _rows(self, x: torch.Tensor, output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """output (n0, ..., out) with row i replaced by its slot's copy of the head applied to x[i], where
        it has one; index (n0,)."""
        slot = index.clamp(min=0)
        mine = self.present[slot] & (index >= 0)  # (n0,)
        shape = (-1,) + (1,) * (output.dim() - 2)
        own = torch.einsum("n...i,noi->n...o", x, self.weight[slot]) + self.bias[slot].view(*shape, output.size(-1))
        return torch.where(mine.view(*shape, 1), own, output)
