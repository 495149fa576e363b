"""PEFT's LoHa format (peft_type "LOHA"), read into and written from an `adapterhub.Adapter`.

Keys on disk, for an nn.Linear (out, in) and rank r (peft/tuners/loha/layer.py):
    base_model.model.<module>.hada_w1_a   (out, r)        base_model.model.<module>.hada_w1_b   (r, in)
    base_model.model.<module>.hada_w2_a   (out, r)        base_model.model.<module>.hada_w2_b   (r, in)
In the Adapter, each module holds those four tensors plus "scale": () fp64 = alpha / r, where r and
alpha come from rank_pattern / alpha_pattern when one of their keys matches the module.
Convolution LoHa (hada_t1 / hada_t2 with use_effective_conv2d) is refused with its reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from adapterhub import Adapter, AdapterError
from adapterhub.formats import (
    alpha_for,
    is_targeted,
    pattern_key,
    rank_and_alpha,
    rank_and_alpha_patterns,
    read_peft,
    target_schema,
    write_peft,
)

from .slots import FACTORS

PEFT_TYPES = ("LOHA",)
ALPHA_KEY = "alpha"  # LoHaConfig names its alpha "alpha" (LoRA: "lora_alpha")
PREFIX = "base_model.model."  # PEFT's key prefix, for error messages
_CONV = (
    "a convolution LoHa with use_effective_conv2d (the CP tensors hada_t1/hada_t2), which adapterhub-loha does "
    "not support: it runs LoHa on nn.Linear layers only; merge the adapter into the model with PEFT's "
    "merge_and_unload(), or re-train it without the Conv layers in target_modules"
)

# The fields of peft 0.21.2's LoHaConfig; other keys are kept in Adapter.config with a warning.
KNOWN_KEYS = frozenset(
    [
        "alpha",
        "alpha_pattern",
        "auto_mapping",
        "base_model_name_or_path",
        "exclude_modules",
        "inference_mode",
        "init_weights",
        "layers_pattern",
        "layers_to_transform",
        "module_dropout",
        "modules_to_save",
        "peft_type",
        "peft_version",
        "r",
        "rank_dropout",
        "rank_pattern",
        "revision",
        "target_modules",
        "task_type",
        "use_effective_conv2d",
    ]
)

_NUMBER = {"type": "number"}
SCHEMA = {
    "type": "object",
    "properties": {
        "r": {
            "type": "integer",
            "minimum": 1,
            "description": "factor rank of every module without a rank_pattern entry; a slot needs rank r*r",
        },
        "alpha": {**_NUMBER, "description": "scale = alpha / r"},
        "rank_pattern": {
            "anyOf": [{"type": "null"}, {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}}]
        },
        "alpha_pattern": {"anyOf": [{"type": "null"}, {"type": "object", "additionalProperties": _NUMBER}]},
        "rank_dropout": {**_NUMBER, "description": "training only: no effect on inference"},
        "module_dropout": {**_NUMBER, "description": "training only: no effect on inference"},
        "use_effective_conv2d": {"type": "boolean", "description": "Conv layers only; their tensors are refused"},
        "init_weights": {"type": "boolean"},
        **target_schema(),
    },
}


def read_peft_loha(directory: str | os.PathLike, *, allow_pickle: bool = False) -> Adapter:
    """Reads and checks the PEFT LoHa adapter in directory; every problem is an AdapterError."""
    files = read_peft(
        directory,
        peft_types=PEFT_TYPES,
        suffixes=[f".{name}" for name in FACTORS],
        schema=SCHEMA,
        known_keys=KNOWN_KEYS,
        refused={".hada_t1": _CONV, ".hada_t2": _CONV},
        allow_pickle=allow_pickle,
    )
    for regex in [*(files.config.get("rank_pattern") or {}), *(files.config.get("alpha_pattern") or {})]:
        try:
            re.compile(regex)
        except re.error as e:
            raise AdapterError(
                f"{files.file}: {regex!r} is not a valid regular expression ({e}); fix adapter_config.json"
            ) from e
    modules = {
        module: _module(files.config, files.file, module, {s.lstrip("."): t for s, t in parts.items()})
        for module, parts in files.modules.items()
    }
    return Adapter(
        type="loha", config=files.config, modules=modules, modules_to_save=files.modules_to_save, source=str(directory)
    )


def _module(config: dict, file: Path, module: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One module's factors checked against each other and against the config's r, alpha and targets."""
    missing = [name for name in FACTORS if name not in parts]
    if missing:
        raise AdapterError(
            f"{file}: {PREFIX}{module} has {sorted(parts)} but not {missing}; a LoHa module needs all of hada_w1_a "
            "(out, r), hada_w1_b (r, in), hada_w2_a (out, r), hada_w2_b (r, in): save the adapter again"
        )
    check_factor_shapes(file, module, parts)
    r, alpha = rank_and_alpha(config, module, ALPHA_KEY)
    if parts["hada_w1_b"].size(0) != r:
        r_key = pattern_key(config.get("rank_pattern") or {}, module)
        entry = "r" if r_key is None else f"rank_pattern[{r_key!r}]"
        raise AdapterError(
            f"{file}: module {module} has rank {parts['hada_w1_b'].size(0)} in its tensors but adapter_config.json "
            f"gives it {entry}={r}; set that entry to {parts['hada_w1_b'].size(0)} (or save the adapter again)"
        )
    if not is_targeted(config, module):
        raise AdapterError(
            f"{file}: module {module} has LoHa tensors but target_modules/layers_to_transform/exclude_modules in "
            "adapter_config.json do not select it, so PEFT would ignore them; add it to target_modules or drop them"
        )
    return {**parts, "scale": torch.tensor(alpha / r, dtype=torch.float64)}


def check_factor_shapes(file: Path | str, module: str, parts: dict[str, torch.Tensor]) -> None:
    """w1a, w2a (out, r) and w1b, w2b (r, in), all 2-D, non-empty, with one out, one in and one r."""
    key = f"{PREFIX}{module}"
    shapes = {name: tuple(parts[name].shape) for name in FACTORS}
    if any(len(shape) != 2 or 0 in shape for shape in shapes.values()):
        raise AdapterError(
            f"{file}: {key} factors have shapes {shapes}; expected 2-D, non-empty (out, r) / (r, in): convolution "
            "LoHa is not supported, and 1-D or empty tensors mean ZeRO-3/FSDP shards were saved without gathering: "
            "gather them and save again"
        )
    out_features, r = shapes["hada_w1_a"]
    in_features = shapes["hada_w1_b"][1]
    expected = {
        "hada_w1_a": (out_features, r),
        "hada_w1_b": (r, in_features),
        "hada_w2_a": (out_features, r),
        "hada_w2_b": (r, in_features),
    }
    for name in FACTORS:
        if shapes[name] != expected[name]:
            raise AdapterError(
                f"{file}: {key}.{name} has shape {shapes[name]}, expected {expected[name]} to match "
                f"{key}.hada_w1_a {shapes['hada_w1_a']} and .hada_w1_b {shapes['hada_w1_b']} (one rank r for both "
                "Hadamard factors); save the adapter again"
            )


def write_peft_loha(adapter: Adapter, directory: str | os.PathLike) -> None:
    """Writes adapter as PEFT's save_pretrained would, loadable by PeftModel.from_pretrained. The config
    states the actual ranks and alphas: r/alpha are the most common ones, rank_pattern/alpha_pattern
    give the others by full module path, target_modules lists the module paths exactly."""
    directory = Path(directory)
    for module, m in adapter.modules.items():
        check_factor_shapes(directory / "adapter_model.safetensors", module, m)
    modules = {module: {f".{name}": m[name] for name in FACTORS} for module, m in adapter.modules.items()}
    write_peft(directory, _config_for(adapter), modules, adapter.modules_to_save)


def _config_for(adapter: Adapter) -> dict:
    """adapter.config with r/alpha/patterns/targets rewritten from the modules themselves."""
    ranks = {name: m["hada_w1_b"].size(0) for name, m in adapter.modules.items()}
    patterns = rank_and_alpha_patterns(
        ranks, {name: alpha_for(float(m["scale"]), ranks[name]) for name, m in adapter.modules.items()}
    )
    return {
        **adapter.config,
        "peft_type": "LOHA",
        **patterns,
        "target_modules": sorted(adapter.modules),
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "modules_to_save": sorted(adapter.modules_to_save) or None,
    }
