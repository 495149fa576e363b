"""Which modules an adapter adapts: linear layers (nn.Linear and transformers' Conv1D) and PEFT's
rules for module names (peft.utils.other, peft.tuners.tuners_utils): target_modules, exclude_modules,
layers_to_transform / layers_pattern, modules_to_save, rank_pattern / alpha_pattern keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import AdapterError
from .adapter import Adapter

ALL_LINEAR = "all-linear"  # PEFT's shorthand; PEFT itself saves the expanded list


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in): transformers' Conv1D stores it transposed."""
    return module.weight.T if is_conv1d(module) else module.weight


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2): what low-rank types adapt."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def require_linear(adapter: Adapter, path: str, module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear/Conv1D target, or an AdapterError naming the adapter and module."""
    if not is_linear(module):
        raise AdapterError(
            f"{adapter.source}: the {adapter.type} adapter adapts {path!r}, a "
            f"{type(module).__name__}; {adapter.type} adapts nn.Linear (and Conv1D) modules only"
        )
    out_features, in_features = linear_weight(module).shape
    return out_features, in_features


def find_linears(model: nn.Module, target_modules: Sequence[str] | str | None) -> dict[str, nn.Module]:
    """Linear layers to adapt: by default every nn.Linear / Conv1D inside the model's repeated
    blocks (any nn.ModuleList); else names (exact or dotted suffix) or one regex (full match)."""
    linear = {name: m for name, m in model.named_modules() if is_linear(m)}
    if target_modules is None:
        blocks = [name + "." for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        chosen = {n: m for n, m in linear.items() if any(n.startswith(b) for b in blocks)}
    elif isinstance(target_modules, str):
        chosen = {n: m for n, m in linear.items() if re.fullmatch(target_modules, n)}
    else:
        wanted = list(target_modules)
        chosen = {n: m for n, m in linear.items() if any(n == t or n.endswith("." + t) for t in wanted)}
    if not chosen:
        raise AdapterError(
            f"no linear layer of {type(model).__name__} matches target_modules={target_modules!r}; "
            f"linear layers include {sorted(linear)[:8]}"
        )
    return chosen


def linear_targets(model: nn.Module, config: dict) -> list[tuple[str, nn.Module]]:
    """The linear layers a PEFT config selects, for creating a fresh adapter: its target_modules
    with PEFT's rules, where None or "all-linear" means every linear layer in the repeated blocks."""
    if config.get("target_modules") in (None, ALL_LINEAR):
        candidates = find_linears(model, None)
    else:
        candidates = {n: m for n, m in model.named_modules() if is_linear(m)}
    return [(path, m) for path, m in candidates.items() if is_targeted(config, path)]


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first rank_pattern/alpha_pattern key whose regex matches a dotted suffix of module, or None."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def is_targeted(config: dict, module: str) -> bool:
    """Whether PEFT adapts module (check_target_module_exists).

    target_modules None or "all-linear" cannot be judged without the model: True.
    """
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, module):
        return False
    if isinstance(exclude, list) and (module in exclude or any(module.endswith(f".{e}") for e in exclude)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if targets is None or targets == ALL_LINEAR:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(module, config.get("layers_pattern"))
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def matches(names: str | list[str] | None, module: str) -> bool:
    """Whether module is named by a PEFT module list (plain suffix, as PEFT's IA3 checks
    feedforward_modules with str.endswith) or regex (full match)."""
    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module.endswith(n) for n in names)


def _layer_index(module: str, layers_pattern: str | list[str] | None) -> int | None:
    """The first numbered path segment after a layers_pattern name (any name when none is given)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module) for p in patterns)), None)
    return int(match["idx"]) if match else None


def saved_module(path: str, modules_to_save: Iterable[str]) -> str | None:
    """The modules_to_save module a key path (module path + param name) belongs to, or None.

    PEFT wraps every module whose name ends with an entry (plain string suffix); the outermost one wins.
    """
    parts = path.split(".")
    names = list(modules_to_save)
    for end in range(1, len(parts)):
        candidate = ".".join(parts[:end])
        if any(candidate.endswith(name) for name in names):
            return candidate
    return None


def target_schema() -> dict:
    """JSON Schema fragments of the module-selection keys every PEFT config shares."""
    names_or_regex = {"anyOf": [{"type": "null"}, {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    return {
        "target_modules": names_or_regex,
        "exclude_modules": names_or_regex,
        "modules_to_save": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"type": "string"}}]},
        "layers_to_transform": {
            "anyOf": [{"type": "null"}, {"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]
        },
        "layers_pattern": names_or_regex,
        "fan_in_fan_out": {"type": "boolean"},
    }
