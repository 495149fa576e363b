"""The LoHa adapter type: PEFT's format in and out, LohaSlots (rank r*r low-rank slots) in the model.

    y[i] = base(x)[i] + scale[s] * (x[i] @ A'[s].T) @ B'[s].T       A', B': see slots.py
A LoHa of factor rank r needs Backbone max_rank >= r*r.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from adapterhub import Adapter, AdapterError, AdapterType
from adapterhub.formats import check_config, check_shape, linear_targets, rank_and_alpha

from .format import ALPHA_KEY, PEFT_TYPES, SCHEMA, read_peft_loha, write_peft_loha
from .slots import FACTORS, LohaSlots


class LohaType(AdapterType):
    name = "loha"
    packed = True  # routes per position (Route.rows), so it runs in the server's packed steps
    aliases = PEFT_TYPES
    config_schema = SCHEMA
    description = "LoHa (PEFT format) on nn.Linear, run as rank r*r low-rank slots: needs max_rank >= r*r"

    def read(self, directory: Path, *, allow_pickle: bool = False) -> Adapter:
        return read_peft_loha(directory, allow_pickle=allow_pickle)

    def write(self, adapter: Adapter, directory: Path) -> None:
        write_peft_loha(adapter, directory)

    def rank(self, adapter: Adapter) -> int:
        """r*r: the rank of the Hadamard product as one low-rank pair (what a slot holds)."""
        return max((m["hada_w1_b"].size(0) ** 2 for m in adapter.modules.values()), default=0)

    def check(self, adapter: Adapter, model: nn.Module) -> None:
        for path, tensors in adapter.modules.items():
            out_features, in_features = _require_nn_linear(adapter.source, path, model.get_submodule(path))
            r = tensors["hada_w1_b"].size(0)
            for name in FACTORS:
                check_shape(adapter, path, name, (out_features, r) if name.endswith("_a") else (r, in_features))

    def composition_methods(self) -> tuple[str, ...]:
        """ "cat" only: a row routed to several LoHa slots adds each slot's delta (scale * B' @ A') times its
        weight (LohaSlots are LowRankSlots), exactly and without merging anything. PEFT defines no
        add_weighted_adapter for LoHa, so there is no materialized method to match; cat_scale stays 1,
        as each slot keeps its own alpha / r."""
        return ("cat",)

    def allocate(self, module: nn.Module, path: str, slots: int, max_rank: int) -> LohaSlots:
        _require_nn_linear("allocate", path, module)
        return LohaSlots(module, slots, max_rank)

    def init(self, model: nn.Module, config: dict) -> Adapter:
        """PEFT's init: hada_w1_a, hada_w1_b, hada_w2_a ~ kaiming_uniform(a=sqrt(5)), hada_w2_b = 0 (the
        adapter starts as identity); init_weights=False: all four random, as PEFT does."""
        config = {"peft_type": "LOHA", "r": 8, "alpha": 8, **config}
        check_config(config, SCHEMA, "init config")
        modules = {}
        for path, module in linear_targets(model, config):
            out_features, in_features = _require_nn_linear("init", path, module)
            r, alpha = rank_and_alpha(config, path, ALPHA_KEY)
            shapes = {
                "hada_w1_a": (out_features, r),
                "hada_w1_b": (r, in_features),
                "hada_w2_a": (out_features, r),
                "hada_w2_b": (r, in_features),
            }
            tensors = {name: torch.empty(shape, dtype=module.weight.dtype) for name, shape in shapes.items()}
            for name, t in tensors.items():
                if name == "hada_w2_b" and config.get("init_weights", True):
                    nn.init.zeros_(t)
                else:
                    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            modules[path] = {**tensors, "scale": torch.tensor(alpha / r, dtype=torch.float64)}
        if not modules:
            raise AdapterError(
                f"init: target_modules={config.get('target_modules')!r} selects no linear layer of "
                f"{type(model).__name__}"
            )
        return Adapter(type=self.name, config=config, modules=modules, source="init")


def _require_nn_linear(source: str, path: str, module: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear: PEFT's LoHa has no GPT-2 Conv1D layer, and its Conv layers are not supported."""
    if not isinstance(module, nn.Linear):
        raise AdapterError(
            f"{source}: the loha adapter adapts {path!r}, a {type(module).__name__}; adapterhub-loha runs LoHa on "
            "nn.Linear modules only (PEFT's LoHa has no Conv1D layer, and its Conv1d/Conv2d layers are not "
            "supported here): choose nn.Linear target_modules, or merge the adapter with PEFT's merge_and_unload()"
        )
    return tuple(module.weight.shape)
