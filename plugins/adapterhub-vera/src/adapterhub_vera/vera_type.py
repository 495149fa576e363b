"""The VeRA adapter type: PEFT's format in and out, VeraSlots (rank-r low-rank slots) in the model.

    y[i] = base(x)[i] + (x[i] @ A_eff[s].T) @ B_eff[s].T      A_eff, B_eff: see slots.py
A VeRA of rank r needs Backbone max_rank >= r (PEFT's default r is 256).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adapterhub import Adapter, AdapterError, AdapterType
from adapterhub.formats import check_config, check_shape, is_linear, linear_targets, linear_weight, require_linear

from .format import DEFAULT_R, PEFT_TYPES, SCHEMA, read_peft_vera, shared_projections, write_peft_vera
from .projections import make_projections
from .slots import VeraSlots


class VeraType(AdapterType):
    name = "vera"
    packed = True  # routes per position (Route.rows), so it runs in the server's packed steps
    aliases = PEFT_TYPES
    config_schema = SCHEMA
    description = "VeRA (PEFT format) on nn.Linear/Conv1D, run as rank-r low-rank slots: needs max_rank >= r"

    def read(self, directory: Path, *, allow_pickle: bool = False) -> Adapter:
        return read_peft_vera(directory, allow_pickle=allow_pickle)

    def write(self, adapter: Adapter, directory: Path) -> None:
        write_peft_vera(adapter, directory)

    def rank(self, adapter: Adapter) -> int:
        return max((m["vera_lambda_d"].size(0) for m in adapter.modules.values()), default=0)

    def check(self, adapter: Adapter, model: nn.Module) -> None:
        """Checks every module against the model; an adapter saved with save_projection=False gets its
        projections here, regenerated from projection_prng_key as PEFT does on load: their sizes are
        the largest in / out features of the adapted modules, which only the model knows."""
        dims = {path: require_linear(adapter, path, model.get_submodule(path)) for path in adapter.modules}
        r = self.rank(adapter)
        for path, (out_features, _) in dims.items():
            check_shape(adapter, path, "vera_lambda_b", (out_features,))
            check_shape(adapter, path, "vera_lambda_d", (r,))
        max_out = max(out_features for out_features, _ in dims.values())
        max_in = max(in_features for _, in_features in dims.values())
        if all("vera_A" not in m for m in adapter.modules.values()):
            vera_A, vera_B = make_projections(r, max_in, max_out, adapter.config.get("projection_prng_key", 0))
            for tensors in adapter.modules.values():
                tensors.update(vera_A=vera_A, vera_B=vera_B)
        vera_A, vera_B = shared_projections(adapter)
        if vera_A.shape[0] != r or vera_A.shape[1] < max_in or vera_B.shape[1] != r or vera_B.shape[0] < max_out:
            raise AdapterError(
                f"{adapter.source}: vera_A has shape {tuple(vera_A.shape)} and vera_B {tuple(vera_B.shape)}, but the "
                f"adapted modules of this backbone need at least ({r}, {max_in}) and ({max_out}, {r}); was the "
                "adapter trained on another base model?"
            )

    def trainable(self, adapter: Adapter) -> list[tuple[str, str]]:
        """The per-module lambdas; the shared projections stay frozen, as in PEFT."""
        return [(path, key) for path in adapter.modules for key in ("vera_lambda_d", "vera_lambda_b")]

    def composition_methods(self) -> tuple[str, ...]:
        """ "cat" only: a row routed to several VeRA slots adds each slot's low-rank delta times its weight
        (VeraSlots are LowRankSlots), exactly and without merging anything. PEFT defines no
        add_weighted_adapter for VeRA, so there is no materialized method to match; cat_scale stays 1,
        as the slots hold each adapter's whole delta at scale 1."""
        return ("cat",)

    def allocate(self, module: nn.Module, path: str, slots: int, max_rank: int) -> VeraSlots:
        if not is_linear(module):
            raise AdapterError(f"VeRA adapts nn.Linear (and Conv1D) modules; {path!r} is a {type(module).__name__}")
        return VeraSlots(module, slots, max_rank)

    def init(self, model: nn.Module, config: dict) -> Adapter:
        """PEFT's init: the projections from projection_prng_key (projections.py), lambda_b = 0 and
        lambda_d = d_initial, so the adapter starts as identity; init_weights=False: lambda_b = 1 and
        lambda_d ~ N(0, 1), as PEFT does. Pass target_modules: None means every linear layer of the
        repeated blocks here, while PEFT picks a per-architecture default."""
        config = {
            "peft_type": "VERA",
            "r": DEFAULT_R,
            "projection_prng_key": 0,
            "d_initial": 0.1,
            "save_projection": True,
            **config,
        }
        check_config(config, SCHEMA, "init config")
        if config.get("bias", "none") != "none":
            raise AdapterError(f"init: bias={config['bias']!r} is not supported; use bias='none'")
        targets = {path: module for path, module in linear_targets(model, config)}
        if not targets:
            raise AdapterError(
                f"init: target_modules={config.get('target_modules')!r} selects no linear layer of "
                f"{type(model).__name__}"
            )
        dims = {path: tuple(linear_weight(module).shape) for path, module in targets.items()}  # (out, in)
        r = config["r"]
        vera_A, vera_B = make_projections(
            r, max(i for _, i in dims.values()), max(o for o, _ in dims.values()), config["projection_prng_key"]
        )
        modules = {}
        for path, module in targets.items():
            kw = dict(dtype=module.weight.dtype)
            if config.get("init_weights", True):
                lambda_b, lambda_d = torch.zeros(dims[path][0], **kw), torch.full((r,), config["d_initial"], **kw)
            else:
                lambda_b, lambda_d = torch.ones(dims[path][0], **kw), torch.randn(r, **kw)
            modules[path] = {"vera_lambda_b": lambda_b, "vera_lambda_d": lambda_d, "vera_A": vera_A, "vera_B": vera_B}
        return Adapter(type=self.name, config=config, modules=modules, source="init")
