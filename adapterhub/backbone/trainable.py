"""Adapters resident in a Backbone, made trainable where they live: in their slots.

    with bb.training(["upper", "json"]) as trainable:
        optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-3)
        with bb.use(["upper", "json", "upper"]):      # each row trains its own adapter
            loss = model(ids, labels=ids).loss
        loss.backward(); optimizer.step()

Each adapter's trainable tensors (AdapterType.trainable, plus its modules_to_save heads) become
nn.Parameters. Before every forward that records gradients, the slot tensors those adapters touch
are replaced by clones into which the parameters are written with the type's own `write`
(differentiable copies), so the forward reads them through the same slot code as inference and
gradients flow from each row's loss to exactly the adapter of that row's slot; the clones are put
back after the forward. From the forward until its backward has computed the parameters'
gradients, the step is in flight (`Backbone.training_step`): loads and swaps from other threads wait,
so they neither write into the clones nor change slot tensors the backward still reads. A forward
without gradients (evaluation, generate()) first writes changed parameters into the real slots.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..formats import Adapter

if TYPE_CHECKING:
    from .backbone import Backbone


class Trainable:
    """The trainable parameters of some resident adapters, and the hooks that route them into the slots."""

    def __init__(self, backbone: Backbone, adapters: dict[str, Adapter]):
        self.backbone = backbone
        self.adapters = adapters  # name -> its tensors; the trainable ones are nn.Parameters
        self._params: dict[str, dict[str, nn.Parameter]] = {}  # name -> "path.key" -> parameter
        for name, adapter in adapters.items():
            own = self._params[name] = {}
            for path, key in backbone.types.get(adapter.type).trainable(adapter):
                label = f"{path}.{key}" if path else key  # path "": the model itself (prompt tuning)
                own[label] = adapter.modules[path][key] = nn.Parameter(adapter.modules[path][key])
            for path, state in adapter.modules_to_save.items():
                for key in list(state):
                    own[f"{path}.{key}"] = state[key] = nn.Parameter(state[key])
        self._originals: list[tuple[nn.Module, str, torch.Tensor]] = []  # buffers replaced during a forward
        self._cloned: set[int] = set()  # ids of the slot modules whose buffers are cloned
        self._end_step: Callable[[], None] | None = None  # ends the training step in flight
        self._backward_hook = None  # fires when the step's backward has reached every parameter
        self._synced = self._version()

    def parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Every trainable parameter (of `name` only, if given)."""
        return [p for n, own in self._params.items() if name in (None, n) for p in own.values()]

    def named_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """`name`'s parameters by "module path.tensor name" (a head's: "classifier.weight")."""
        return dict(self._params[name])

    def adapter(self, name: str) -> Adapter:
        """`name` with its current values, detached, on the CPU: what `Backbone.save` would write."""
        return self.adapters[name].to("cpu")

    # ---- forward hooks (installed by Backbone.training) -------------------------------------
    def before_forward(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            self.end_step()  # a previous step whose backward never ran
            self._end_step = self.backbone.training_step()
            try:
                self._write(differentiable=True)
            except BaseException:
                self.restore()
                self.end_step()
                raise
            wanted = [p for p in self.parameters() if p.requires_grad]
            if wanted:
                self._backward_hook = torch.autograd.graph.register_multi_grad_hook(
                    wanted, lambda grads: self.end_step(), mode="all"
                )
        elif self._version() != self._synced:
            self.sync()

    def after_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        self.restore()

    def sync(self) -> None:
        """Writes the current parameters into the real slots (evaluation and the end of training)."""
        with torch.no_grad():
            self._write(differentiable=False)
        self._synced = self._version()

    def restore(self) -> None:
        """Puts back the slot tensors that a recording forward replaced with clones."""
        for owner, key, tensor in self._originals:
            owner._buffers[key] = tensor
        self._originals.clear()
        self._cloned.clear()

    def end_step(self) -> None:
        """Ends the training step in flight, if any: its backward ran, or never will (the next step
        began, or the training block ended)."""
        hook, end = self._backward_hook, self._end_step
        self._backward_hook = self._end_step = None
        if hook is not None:
            hook.remove()
        if end is not None:
            end()

    # ---- internals ---------------------------------------------------------------------------
    def _version(self) -> int:
        return sum(p._version for p in self.parameters())

    def _write(self, differentiable: bool) -> None:
        for name, adapter in self.adapters.items():
            if differentiable:
                for slots in self.backbone.slot_modules(name):
                    self._clone_buffers(slots)
            self.backbone.rewrite(name, adapter)

    def _clone_buffers(self, slots: nn.Module) -> None:
        """Replaces every buffer of `slots` (and its children) by a clone, once per forward: the trainable
        ones receive the parameters, and all of them, integer ones too (ranks), are what autograd saves
        for the backward, which may run after the originals have been written again by a load."""
        if id(slots) in self._cloned:
            return
        self._cloned.add(id(slots))
        for owner in slots.modules():
            for key, tensor in list(owner._buffers.items()):
                if tensor is not None:
                    self._originals.append((owner, key, tensor))
                    owner._buffers[key] = tensor.clone()
