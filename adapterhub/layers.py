"""Slot tensors on the backbone's target modules and the forward hooks that use them.

A target module (nn.Linear, or transformers' Conv1D) keeps its own forward and
parameters; `LoraSlots` is attached to it as a child holding non-persistent buffers (so
`model.state_dict()` is unchanged) and a forward hook adds each row's delta in place:

    y[i] = base(x)[i] + scale[s] * (x[i] @ A[s, :r].T) @ B[s, :, :r].T    s = slot of row i (-1: none)
    DoRA slots: y[i] = g[s] * (base(x)[i] - bias + delta) + bias,       g = magnitude / ||W + scale B A||_row

`HeadSlots` does the same for modules_to_save (full per-adapter copies of e.g. a classifier).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops


@dataclass
class Routing:
    """The batch in flight, shared by every hook: per-row slot ids and what they need."""

    index: torch.Tensor | None = None  # (n,) int64 slot per row, -1 = base; None: no adapter in use
    broadcast: bool = False  # index holds one slot for every row of any batch
    dora: bool = False  # some row uses a DoRA adapter
    _per_row: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def rows(self, n0: int, rows: int, device: torch.device) -> torch.Tensor:
        """index for x (n0, ..., in) flattened to (rows, in) on x's device (a model may span
        devices): every position of row i gets row i's slot."""
        if torch.compiler.is_compiling():
            return self._expand(n0, rows).to(device)
        key = (n0, rows, device)
        if key not in self._per_row:
            self._per_row[key] = self._expand(n0, rows).to(device)
        return self._per_row[key]

    def set(self, index: torch.Tensor | None, broadcast: bool = False, dora: bool = False) -> None:
        self.index, self.broadcast, self.dora = index, broadcast, dora
        self._per_row = {}

    def _expand(self, n0: int, rows: int) -> torch.Tensor:
        index = self.index
        if self.broadcast:
            index = index.expand(n0).contiguous()
        elif index.size(0) != n0:
            raise ValueError(f"the batch has {n0} rows but Backbone.use routes {index.size(0)}; give one name "
                             "per row (with repeat=k when generate() expands each row k times: num_beams x "
                             "num_return_sequences), or a single name for all rows")
        return index if rows == n0 else index.repeat_interleave(rows // n0)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in): transformers' Conv1D stores it transposed."""
    return module.weight.T if is_conv1d(module) else module.weight


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class LoraSlots(nn.Module):
    """Preallocated LoRA slots of one target module; writes go in place, shapes never change."""

    def __init__(self, base: nn.Module, routing: Routing, slots: int, max_rank: int):
        super().__init__()
        weight = linear_weight(base)  # (out, in)
        out_features, in_features = weight.shape
        kw = dict(device=weight.device)
        self.routing = routing
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("A", torch.zeros(slots, max_rank, in_features, dtype=weight.dtype, **kw), persistent=False)
        self.register_buffer("B", torch.zeros(slots, out_features, max_rank, dtype=weight.dtype, **kw),
                             persistent=False)
        self.register_buffer("scale", torch.zeros(slots, dtype=torch.float32, **kw), persistent=False)
        self.register_buffer("ranks", torch.zeros(slots, dtype=torch.int64, **kw), persistent=False)
        # DoRA: magnitude m (as saved) and g = m / ||W + scale B A||_row; row `slots` is the base (g = 1).
        self.register_buffer("magnitude", torch.zeros(slots, out_features, dtype=weight.dtype, **kw),
                             persistent=False)
        self.register_buffer("dora_scale", torch.ones(slots + 1, out_features, dtype=weight.dtype, **kw),
                             persistent=False)
        self.dora_slots: set[int] = set()  # slots whose dora_scale row is not all ones

    def write(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float,
              magnitude: torch.Tensor | None, base: nn.Module) -> None:
        """Copies one adapter's tensors into `slot` (A (r, in), B (out, r)); None: the adapter skips this module.

        Only the first r ranks are written: the kernels never read past `ranks[slot]`.
        """
        buffers = self._buffers  # direct access: this runs for every target module on every load
        r = 0 if A is None else A.size(0)
        if r:
            buffers["A"][slot, :r].copy_(A)
            buffers["B"][slot, :, :r].copy_(B)
        buffers["scale"][slot:slot + 1].fill_(scale if r else 0.0)
        buffers["ranks"][slot:slot + 1].fill_(r)
        if slot in self.dora_slots:
            buffers["dora_scale"][slot].fill_(1.0)
            self.dora_slots.discard(slot)
        if magnitude is not None and r:
            buffers["magnitude"][slot].copy_(magnitude)
            delta = scale * (B.to(torch.float32) @ A.to(torch.float32))  # (out, in)
            norm = torch.linalg.norm(linear_weight(base).to(torch.float32) + delta, dim=1)  # (out,)
            buffers["dora_scale"][slot].copy_(magnitude.to(torch.float32) / norm)
            self.dora_slots.add(slot)

    def read(self, slot: int, dora: bool) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None] | None:
        """(A (r, in), B (out, r), scale, magnitude or None) copied out of `slot`; None if it adapts nothing."""
        r = int(self.ranks[slot])
        if r == 0:
            return None
        magnitude = self.magnitude[slot].clone() if dora else None
        return self.A[slot, :r].clone(), self.B[slot, :, :r].clone(), float(self.scale[slot]), magnitude

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        routing = self.routing
        if routing.index is None:
            return None
        x = args[0]
        x2 = x.reshape(-1, self.in_features).contiguous()  # (rows, in)
        y2 = output.view(-1, self.out_features)  # (rows, out), written in place
        index = routing.rows(x.size(0), x2.size(0), x.device)  # (rows,)
        bias = getattr(module, "bias", None)
        if routing.dora and bias is not None:
            y2.sub_(bias)
        ops.lora_expand(y2, ops.lora_shrink(x2, self.A, index, self.ranks), self.B, self.scale, index, self.ranks)
        if routing.dora:
            base_row = torch.where(index < 0, self.dora_scale.size(0) - 1, index)
            y2.mul_(self.dora_scale[base_row])
            if bias is not None:
                y2.add_(bias)
        return output


class HeadSlots(nn.Module):
    """Per-slot full copies of one small nn.Linear (PEFT's modules_to_save, e.g. a classifier),
    chosen per row by gathering each row's copy: no Python branch on which slots are present,
    so a compiled model does not recompile as adapters with heads come and go."""

    MAX_PARAMETERS = 1 << 22  # a classifier or score head; not lm_head or embeddings

    def __init__(self, base: nn.Linear, routing: Routing, slots: int):
        super().__init__()
        self.routing = routing
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.register_buffer("weight", torch.zeros(slots, *base.weight.shape, **kw), persistent=False)
        self.register_buffer("bias", torch.zeros(slots, base.weight.size(0), **kw), persistent=False)
        self.register_buffer("present", torch.zeros(slots, dtype=torch.bool, device=kw["device"]), persistent=False)
        self.has_bias = base.bias is not None

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.routing.index is None:
            return None
        x = args[0]  # (n0, ..., in)
        index = self.routing.rows(x.size(0), x.size(0), x.device)  # (n0,)
        slot = index.clamp(min=0)
        mine = self.present[slot] & (index >= 0)  # (n0,)
        shape = (-1,) + (1,) * (output.dim() - 2)
        own = torch.einsum("n...i,noi->n...o", x, self.weight[slot]) + self.bias[slot].view(*shape, output.size(-1))
        return torch.where(mine.view(*shape, 1), own, output)
