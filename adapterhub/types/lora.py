"""LoRA (and DoRA, rsLoRA) in PEFT's format, computed with the gathered low-rank ops.

y[i] = base(x)[i] + scale[s] * (x[i] @ A[s, :r].T) @ B[s, :, :r].T    s = slot of row i (-1: none)
DoRA slots: y[i] = g[s] * (base(x)[i] - bias + delta) + bias,       g = magnitude / ||W + scale B A||_row
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError
from ..formats import Adapter, check_config, check_shape, is_linear, linear_targets, linear_weight, require_linear
from ..formats.peft import rank_and_alpha
from ..formats.peft_lora import PEFT_TYPES, SCHEMA, lora_scale, read_peft_lora, write_peft_lora
from ..plugins.contract import AdapterType, Route
from ..plugins.hookspecs import hookimpl
from ..plugins.low_rank import LowRankSlots
from .lora_compose import METHODS, cat_scale, compose_lora


class LoraSlots(LowRankSlots):
    """LowRankSlots plus DoRA's per-slot magnitude rescaling."""

    def __init__(self, base: nn.Module, slots: int, max_rank: int):
        super().__init__(base, slots, max_rank)
        kw = dict(device=self.A.device, dtype=self.A.dtype)
        self._base = [base]  # a list, so that the base module is not registered as our child
        # DoRA: magnitude m (as saved) and g = m / ||W + scale B A||_row; row `slots` is the base (g = 1).
        self.register_buffer("magnitude", torch.zeros(slots, self.out_features, **kw), persistent=False)
        self.register_buffer("dora_scale", torch.ones(slots + 1, self.out_features, **kw), persistent=False)
        self.dora_slots: set[int] = set()  # slots holding a DoRA adapter for this module

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        if tensors is None:
            self.write_low_rank(slot, None, None)
        else:
            self.write_low_rank(slot, tensors["A"], tensors["B"], float(tensors["scale"]))
        if slot in self.dora_slots:
            self.dora_scale[slot].fill_(1.0)
            self.dora_slots.discard(slot)
        if tensors is not None and "magnitude" in tensors:
            magnitude = tensors["magnitude"]
            self.magnitude[slot].copy_(magnitude)
            delta = float(tensors["scale"]) * (tensors["B"].to(torch.float32) @ tensors["A"].to(torch.float32))
            norm = torch.linalg.norm(linear_weight(self._base[0]).to(torch.float32) + delta.to(self.A.device), dim=1)
            self.dora_scale[slot].copy_(magnitude.to(norm) / norm)  # (out,)
            self.dora_slots.add(slot)

    def read(self, slot: int) -> dict[str, torch.Tensor] | None:
        found = self.read_low_rank(slot)
        if found is None:
            return None
        A, B, scale = found
        tensors = {"A": A, "B": B, "scale": torch.tensor(scale, dtype=torch.float64)}
        if slot in self.dora_slots:
            tensors["magnitude"] = self.magnitude[slot].clone()
        return tensors

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor, route: Route) -> torch.Tensor:
        if "dora" not in route.features:
            return self.add_delta(args[0], output, route, module)
        y2 = output.view(-1, self.out_features)  # (rows, out)
        bias = getattr(module, "bias", None)
        if bias is not None:
            y2.sub_(bias)
        self.add_delta(args[0], output, route)
        index = route.rows(args[0].size(0), y2.size(0), y2.device)  # (rows,), or (rows, K) with compositions
        if index.dim() == 2:  # a DoRA row is never composed: its slot is in the first column
            index = index[:, 0]
        y2.mul_(self.dora_scale[torch.where(index < 0, self.dora_scale.size(0) - 1, index)])
        if bias is not None:
            y2.add_(bias)
        return output


class LoraType(AdapterType):
    name = "lora"
    packed = True  # routes per position (Route.rows), so it runs in the server's packed steps
    aliases = PEFT_TYPES
    config_schema = SCHEMA
    description = "LoRA, DoRA and rsLoRA (PEFT format), rank and alpha patterns"

    def read(self, directory: Path, *, allow_pickle: bool = False) -> Adapter:
        return read_peft_lora(directory, allow_pickle=allow_pickle)

    def write(self, adapter: Adapter, directory: Path) -> None:
        write_peft_lora(adapter, directory)

    def features(self, adapter: Adapter) -> frozenset[str]:
        return frozenset({"dora"}) if adapter.config.get("use_dora") else frozenset()

    def rank(self, adapter: Adapter) -> int:
        return max((m["A"].size(0) for m in adapter.modules.values()), default=0)

    def check(self, adapter: Adapter, model: nn.Module) -> None:
        for path, tensors in adapter.modules.items():
            out_features, in_features = require_linear(adapter, path, model.get_submodule(path))
            r = tensors["A"].size(0)
            check_shape(adapter, path, "A", (r, in_features))
            check_shape(adapter, path, "B", (out_features, r))
            if "magnitude" in tensors:
                check_shape(adapter, path, "magnitude", (out_features,))

    def trainable(self, adapter: Adapter) -> list[tuple[str, str]]:
        if adapter.config.get("use_dora"):
            raise AdapterError(
                f"{adapter.source}: DoRA adapters cannot be trained here yet (their magnitude "
                "rescaling runs in place); train a LoRA adapter (use_dora false)"
            )
        return [(path, key) for path in adapter.modules for key in ("A", "B")]

    def composition_methods(self) -> tuple[str, ...]:
        return METHODS

    def compose(self, adapters: list[Adapter], weights: list[float], method: str, options: dict) -> Adapter:
        return compose_lora(adapters, weights, method, options)

    def cat_scale(self, configs: list[dict]) -> float:
        return cat_scale(configs)

    def allocate(self, module: nn.Module, path: str, slots: int, max_rank: int) -> LoraSlots:
        if not is_linear(module):
            raise AdapterError(f"LoRA adapts nn.Linear (and Conv1D) modules; {path!r} is a {type(module).__name__}")
        return LoraSlots(module, slots, max_rank)

    def init(self, model: nn.Module, config: dict) -> Adapter:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) as nn.Linear, B = 0 (the adapter starts as identity)."""
        config = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, **config}
        check_config(config, SCHEMA, "init config")
        if config.get("use_dora"):
            raise AdapterError("init: DoRA adapters cannot be created yet; set use_dora to false")
        modules = {}
        for path, module in linear_targets(model, config):
            out_features, in_features = linear_weight(module).shape
            r, alpha = rank_and_alpha(config, path)
            A = torch.empty(r, in_features, dtype=module.weight.dtype)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            modules[path] = {
                "A": A,
                "B": torch.zeros(out_features, r, dtype=module.weight.dtype),
                "scale": torch.tensor(lora_scale(alpha, r, bool(config.get("use_rslora"))), dtype=torch.float64),
            }
        if not modules:
            raise AdapterError(
                f"init: target_modules={config.get('target_modules')!r} selects no linear layer of "
                f"{type(model).__name__}"
            )
        return Adapter(type=self.name, config=config, modules=modules, source="init")


@hookimpl
def adapter_types() -> list[AdapterType]:
    return [LoraType()]
