"""IA3 in PEFT's format: learned vectors that rescale a layer's activations.

    feedforward modules: y[i] = base(x[i] * l[s])        l = ia3_l (1, in) on disk
    other modules:       y[i] = base(x[i]) * l[s]        l = ia3_l (out, 1) on disk
Rows of other types or of the base use a row of ones, so they pass through exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError
from ..formats import (
    Adapter,
    check_config,
    check_shape,
    is_linear,
    linear_targets,
    linear_weight,
    matches,
    read_peft,
    require_linear,
    target_schema,
    write_peft,
)
from ..plugins.contract import AdapterType, ModuleSlots, Route
from ..plugins.hookspecs import hookimpl

SUFFIX = ".ia3_l"
KNOWN_KEYS = frozenset(
    [
        "auto_mapping",
        "base_model_name_or_path",
        "exclude_modules",
        "fan_in_fan_out",
        "feedforward_modules",
        "inference_mode",
        "init_ia3_weights",
        "modules_to_save",
        "peft_type",
        "peft_version",
        "revision",
        "target_modules",
        "task_type",
        "layers_to_transform",
        "layers_pattern",
    ]
)
SCHEMA = {
    "type": "object",
    "properties": {
        **target_schema(),
        "feedforward_modules": target_schema()["target_modules"],
        "init_ia3_weights": {"type": "boolean"},
    },
}


class IA3Slots(ModuleSlots):
    """Per-slot input and output scales of one Linear/Conv1D; the last row of each is all ones."""

    def __init__(self, base: nn.Module, slots: int):
        super().__init__()
        weight = linear_weight(base)  # (out, in)
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("l_in", torch.ones(slots + 1, self.in_features, **kw), persistent=False)
        self.register_buffer("l_out", torch.ones(slots + 1, self.out_features, **kw), persistent=False)
        self.in_slots: set[int] = set()  # slots that scale this module's input (feedforward)
        self.out_slots: set[int] = set()  # slots that scale its output

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        self.l_in[slot].fill_(1.0)
        self.l_out[slot].fill_(1.0)
        self.in_slots.discard(slot)
        self.out_slots.discard(slot)
        if tensors is not None:
            scales = tensors["ia3_l"]
            feedforward = _is_feedforward(scales)
            (self.l_in if feedforward else self.l_out)[slot].copy_(scales.flatten())
            (self.in_slots if feedforward else self.out_slots).add(slot)

    def read(self, slot: int) -> dict[str, torch.Tensor] | None:
        if slot in self.in_slots:
            return {"ia3_l": self.l_in[slot].clone().view(1, -1)}
        if slot in self.out_slots:
            return {"ia3_l": self.l_out[slot].clone().view(-1, 1)}
        return None

    def before(self, module: nn.Module, args: tuple, kwargs: dict, route: Route) -> tuple[tuple, dict] | None:
        if "input" not in route.features:
            return None
        x = args[0]  # (n0, ..., in)
        return (x * self._scales(self.l_in, route, x),) + args[1:], kwargs

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor, route: Route) -> torch.Tensor | None:
        if "output" not in route.features:
            return None
        return output * self._scales(self.l_out, route, output)

    @staticmethod
    def _scales(table: torch.Tensor, route: Route, like: torch.Tensor) -> torch.Tensor:
        """(n0, 1.., features): each batch row's scale vector, ones for rows without one (a packed
        route: like's shape, each token's own)."""
        if route.packed:
            index = route.rows(like.size(0), like.numel() // like.size(-1), like.device)  # (T,)
            return table[torch.where(index < 0, table.size(0) - 1, index)].view(like.shape)
        index = route.rows(like.size(0), like.size(0), like.device)  # (n0,)
        rows = torch.where(index < 0, table.size(0) - 1, index)
        return table[rows].view(like.size(0), *([1] * (like.dim() - 2)), -1)


class IA3Type(AdapterType):
    name = "ia3"
    packed = True  # routes per position (Route.rows), so it runs in the server's packed steps
    aliases = ("IA3",)
    config_schema = SCHEMA
    description = "IA3 (PEFT format): learned rescaling of layer inputs (feedforward) or outputs"

    def read(self, directory: Path, *, allow_pickle: bool = False) -> Adapter:
        files = read_peft(
            directory,
            peft_types=self.aliases,
            suffixes=[SUFFIX],
            schema=SCHEMA,
            known_keys=KNOWN_KEYS,
            allow_pickle=allow_pickle,
        )
        config = files.config  # feedforward_modules need not be targets here: PEFT saves such configs itself
        modules = {}
        for path, parts in files.modules.items():
            scales = parts[SUFFIX]
            feedforward = matches(config.get("feedforward_modules"), path)
            if scales.ndim != 2 or (scales.size(0) != 1 if feedforward else scales.size(1) != 1):
                raise AdapterError(
                    f"{files.file}: {path}{SUFFIX} has shape {tuple(scales.shape)}, expected "
                    f"{'(1, in)' if feedforward else '(out, 1)'} for a "
                    f"{'feedforward' if feedforward else 'non-feedforward'} module "
                    "(feedforward_modules in adapter_config.json); fix the config or save it again"
                )
            modules[path] = {"ia3_l": scales}
        return Adapter(
            type=self.name, config=config, modules=modules, modules_to_save=files.modules_to_save, source=str(directory)
        )

    def write(self, adapter: Adapter, directory: Path) -> None:
        config = {
            **adapter.config,
            "peft_type": "IA3",
            "target_modules": sorted(adapter.modules),
            "feedforward_modules": sorted(p for p, m in adapter.modules.items() if _is_feedforward(m["ia3_l"])),
            "modules_to_save": sorted(adapter.modules_to_save) or None,
            "exclude_modules": None,
        }
        write_peft(
            directory, config, {p: {SUFFIX: m["ia3_l"]} for p, m in adapter.modules.items()}, adapter.modules_to_save
        )

    def features(self, adapter: Adapter) -> frozenset[str]:
        """ "input" if it scales some module's input (feedforward), "output" if some module's output."""
        return frozenset("input" if _is_feedforward(m["ia3_l"]) else "output" for m in adapter.modules.values())

    def rank(self, adapter: Adapter) -> int:
        return 0  # vectors, no rank: fits any slot

    def check(self, adapter: Adapter, model: nn.Module) -> None:
        for path, tensors in adapter.modules.items():
            out_features, in_features = require_linear(adapter, path, model.get_submodule(path))
            feedforward = _is_feedforward(tensors["ia3_l"])
            check_shape(adapter, path, "ia3_l", (1, in_features) if feedforward else (out_features, 1))

    def composition_methods(self) -> tuple[str, ...]:
        return ("linear",)

    def compose(self, adapters: list[Adapter], weights: list[float], method: str, options: dict) -> Adapter:
        """PEFT's IA3 `add_weighted_adapter`: l = sum_k w_k l_k over the adapters that scale a module
        (not normalized, so weights summing to 1 keep the scale of one adapter)."""
        modules = {}
        for path in dict.fromkeys(p for a in adapters for p in a.modules):
            present = [(a, a.modules[path]["ia3_l"], w) for a, w in zip(adapters, weights) if path in a.modules]
            shapes = {tuple(t.shape) for _, t, _ in present}
            if len(shapes) > 1:
                raise AdapterError(
                    f"cannot compose IA3 adapters that scale {path!r} differently: "
                    + ", ".join(f"{a.source} {tuple(t.shape)}" for a, t, _ in present)
                    + " (one scales its input, feedforward_modules; another its output)"
                )
            merged = torch.zeros_like(present[0][1])
            for _, scales, weight in present:
                merged += scales * weight
            modules[path] = {"ia3_l": merged}
        config = {
            **adapters[0].config,
            "target_modules": sorted(modules),
            "feedforward_modules": sorted(p for p, m in modules.items() if _is_feedforward(m["ia3_l"])),
        }
        return Adapter(type=self.name, config=config, modules=modules, source=f"composition ({method})")

    def allocate(self, module: nn.Module, path: str, slots: int, max_rank: int) -> IA3Slots:
        if not is_linear(module):
            raise AdapterError(f"IA3 adapts nn.Linear (and Conv1D) modules; {path!r} is a {type(module).__name__}")
        return IA3Slots(module, slots)

    def init(self, model: nn.Module, config: dict) -> Adapter:
        """PEFT's init_ia3_weights=True: every vector starts at ones (identity)."""
        config = {"peft_type": "IA3", **config}
        check_config(config, SCHEMA, "init config")
        _check_feedforward(config, "init config")
        modules = {}
        for path, module in linear_targets(model, config):
            out_features, in_features = linear_weight(module).shape
            shape = (1, in_features) if matches(config.get("feedforward_modules"), path) else (out_features, 1)
            modules[path] = {"ia3_l": torch.ones(shape, dtype=module.weight.dtype)}
        if not modules:
            raise AdapterError(f"init: target_modules={config.get('target_modules')!r} selects no linear layer")
        return Adapter(type=self.name, config=config, modules=modules, source="init")


def _is_feedforward(scales: torch.Tensor) -> bool:
    """ia3_l (1, in) scales the input; (out, 1) the output. A (1, 1) vector is taken as an output scale."""
    return scales.size(0) == 1 and scales.size(1) > 1


def _check_feedforward(config: dict, file) -> None:
    """PEFT's rule: feedforward_modules must be a subset of target_modules (when both are lists)."""
    targets, feedforward = config.get("target_modules"), config.get("feedforward_modules")
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        raise AdapterError(
            f"{file}: feedforward_modules {sorted(set(feedforward) - set(targets))} are not in "
            "target_modules; every feedforward module must also be a target"
        )


@hookimpl
def adapter_types() -> list[AdapterType]:
    return [IA3Type()]
