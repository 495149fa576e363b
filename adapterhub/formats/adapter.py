"""An adapter in memory, as any format reads it and any type writes it: per adapted module, the
type's named tensors (on the CPU), plus full copies of modules_to_save heads.

    adapter = Adapter(type="lora", config={...}, modules={"model.layers.0.self_attn.q_proj":
                      {"A": (r, in), "B": (out, r), "scale": () fp64}})
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AdapterError


@dataclass
class Adapter:
    """One adapter as read from disk: per adapted module, the type's named tensors (on the CPU)."""

    type: str  # the AdapterType's name, e.g. "lora"
    config: dict  # its config file as read (unknown keys kept)
    modules: dict[str, dict[str, torch.Tensor]]  # module path in the model -> the type's tensors
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # path -> full state dict
    source: str = ""  # the directory, for error messages

    def to(self, device: str | torch.device) -> Adapter:
        """The same adapter with every tensor on `device` and outside autograd (the host cache keeps
        evicted adapters on the CPU; a trainer's parameters come out as plain tensors)."""

        def moved(group: dict) -> dict:
            return {path: {k: t.detach().to(device) for k, t in parts.items()} for path, parts in group.items()}

        return Adapter(
            type=self.type,
            config=self.config,
            modules=moved(self.modules),
            modules_to_save=moved(self.modules_to_save),
            source=self.source,
        )

    def tensors(self) -> list[torch.Tensor]:
        return [t for m in (*self.modules.values(), *self.modules_to_save.values()) for t in m.values()]

    def nbytes(self) -> int:
        """Bytes of all tensors, a tensor shared by several modules (VeRA's projections) counted once:
        what a load or swap moves, and what the host cache holds."""
        sizes = {
            (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape): t.numel() * t.element_size()
            for t in self.tensors()
        }
        return sum(sizes.values())


def check_shape(adapter: Adapter, path: str, key: str, expected: tuple[int, ...]) -> None:
    """An AdapterError if adapter.modules[path][key] does not have shape `expected` for this backbone."""
    got = tuple(adapter.modules[path][key].shape)
    if got != tuple(expected):
        raise AdapterError(
            f"{adapter.source}: tensor {path}.{key} has shape {got}, expected {tuple(expected)} "
            "for this backbone; was the adapter trained on another base model?"
        )
