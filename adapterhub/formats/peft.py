"""PEFT's on-disk layout, shared by every PEFT-format type: adapter_config.json + adapter_model.safetensors.

    base_model.model.<module>.<type suffix>     the type's tensors, e.g. ".lora_A.weight", ".ia3_l"
    base_model.model.<saved module>.<param>      full copy of a modules_to_save module (classifier.weight)

`read_peft` returns the config (checked against the type's JSON Schema) and the tensors split by
module and suffix, every value checked finite; `write_peft` writes the same layout. The module-
name rules (target_modules, layers_to_transform, exclude_modules, patterns) are PEFT's own
(formats/targets.py); `rank_and_alpha` and `rank_and_alpha_patterns` read and write the per-module
rank and alpha that LoRA-family configs state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import AdapterError
from .files import CONFIG_FILE, check_config, check_values, preview, read_json_object, read_tensors
from .targets import is_targeted, pattern_key, saved_module, target_schema

__all__ = [
    "CONFIG_FILE",
    "PICKLE_FILE",
    "PREFIX",
    "PROMPT_PREFIX",
    "SAFETENSORS_FILE",
    "PeftFiles",
    "alpha_for",
    "check_config",
    "is_targeted",
    "pattern_key",
    "rank_and_alpha",
    "rank_and_alpha_patterns",
    "read_config",
    "read_peft",
    "refuse_features",
    "target_schema",
    "write_peft",
]

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."  # prompt learning: PEFT's model wraps the transformers model without a tuner


@dataclass
class PeftFiles:
    """A PEFT adapter directory read and split: what a type's reader builds its Adapter from."""

    config: dict
    file: Path  # the tensor file, for error messages
    modules: dict[str, dict[str, torch.Tensor]]  # module path -> {suffix: tensor}
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # the `shared` keys found, e.g. prompt_embeddings


def read_peft(
    directory: str | os.PathLike,
    *,
    peft_types: Iterable[str],
    suffixes: Iterable[str],
    schema: Mapping,
    known_keys: Iterable[str] = (),
    refused: Mapping[str, str] | None = None,
    shared: Iterable[str] = (),
    prefix: str = PREFIX,
    allow_pickle: bool = False,
) -> PeftFiles:
    """Reads a PEFT directory whose peft_type is one of `peft_types` and whose tensor keys end with one
    of `suffixes` (or belong to modules_to_save); every problem is an AdapterError naming file and key.
    `refused`: key suffixes the type cannot run -> why and what to do instead. `shared`: whole keys
    outside any module (VeRA's base_model.vera_A, prompt tuning's prompt_embeddings). `prefix`:
    PROMPT_PREFIX for prompt-learning types.

    Safetensors only unless allow_pickle=True, which loads a legacy adapter_model.bin with
    torch.load(weights_only=True). Tensors keep their dtype and stay on the CPU.
    """
    directory = Path(directory)
    config = read_config(directory, peft_types, schema, known_keys)
    tensors, file = read_tensors(directory, allow_pickle, (SAFETENSORS_FILE, PICKLE_FILE))
    suffixes = sorted(suffixes, key=len, reverse=True)
    shared = set(shared)
    files = PeftFiles(config=config, file=file, modules={})
    unexpected = []
    for key, tensor in tensors.items():
        for suffix, why in (refused or {}).items():
            if key.endswith(suffix):
                raise AdapterError(f"{file}: {key}: {why}")
        check_values(file, key, tensor)
        path = key.removeprefix(prefix)
        suffix = next((s for s in suffixes if path.endswith(s)), None) if key.startswith(prefix) else None
        if key in shared:
            files.shared[key] = tensor
        elif suffix is not None:
            files.modules.setdefault(path.removesuffix(suffix), {})[suffix] = tensor
        elif key.startswith(prefix) and (owner := saved_module(path, config.get("modules_to_save") or [])):
            files.modules_to_save.setdefault(owner, {})[path.removeprefix(owner + ".")] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise AdapterError(
            f"{file}: {len(unexpected)} unexpected key(s) {preview(unexpected)}; expected '{prefix}<module>' + one "
            f"of {suffixes}{f', one of {sorted(shared)}' if shared else ''}, or a parameter of a module in "
            f"modules_to_save ({config.get('modules_to_save')}): remove them or list their module in "
            "modules_to_save in adapter_config.json"
        )
    if not files.modules and not files.shared:
        raise AdapterError(
            f"{file}: no tensor ends with {suffixes or sorted(shared)}: this is not a "
            f"{'/'.join(peft_types)} adapter; re-save it with PEFT"
        )
    files.modules = dict(sorted(files.modules.items()))
    return files


def read_config(directory: Path, peft_types: Iterable[str], schema: Mapping, known_keys: Iterable[str] = ()) -> dict:
    """adapter_config.json parsed and checked: JSON object, peft_type, the type's schema."""
    file = directory / CONFIG_FILE
    if not os.path.lexists(file):  # else read_json_object says why it cannot be read
        nested = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_FILE}"))
        hint = f"; subfolders with one: {nested}: pass subfolder=" if nested else ""
        raise AdapterError(
            f"no {CONFIG_FILE} in {directory}{hint}; a PEFT adapter directory holds {CONFIG_FILE} and "
            f"{SAFETENSORS_FILE}: pass the directory that save_pretrained wrote"
        )
    config = read_json_object(file, resave="re-save the adapter")
    peft_types = tuple(peft_types)
    if config.get("peft_type") not in peft_types:
        raise AdapterError(
            f"{file}: peft_type {config.get('peft_type')!r} is not {' or '.join(peft_types)}; "
            "load it with the adapter type for its peft_type (Backbone.load finds it by itself)"
        )
    check_config(config, schema, file)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), str):
            try:
                re.compile(config[key])
            except re.error as e:
                raise AdapterError(
                    f"{file}: {key} {config[key]!r} is not a valid regular expression ({e}); fix {CONFIG_FILE}"
                ) from e
    unknown = sorted(set(config) - set(known_keys)) if known_keys else []
    if unknown:
        logger.warning(
            "%s: unknown keys %s are kept in the adapter's config but not used (probably written by a newer PEFT)",
            file,
            unknown,
        )
    return config


def refuse_features(config: dict, features: Mapping[str, str], file: Path, fix: str) -> None:
    """An AdapterError for the first config key of `features` (key -> what it does) that is switched on."""
    for key, what in features.items():
        value = config.get(key)
        if value and value != "none":
            raise AdapterError(f"{file}: {key}={value!r} ({what}) is not supported yet: {fix}")


def write_peft(
    directory: str | os.PathLike,
    config: dict,
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    modules_to_save: Mapping[str, Mapping[str, torch.Tensor]],
    extra: Mapping[str, torch.Tensor] | None = None,
    prefix: str = PREFIX,
) -> None:
    """Writes config and tensors (module path -> {suffix: tensor}) as PEFT's save_pretrained does;
    `extra` tensors are written under their own keys (e.g. prompt_embeddings, VeRA's shared projections).
    `prefix`: PROMPT_PREFIX for prompt-learning types, whose PEFT model wraps the model directly."""
    directory = Path(directory)
    tensors = {f"{prefix}{m}{suffix}": t for m, parts in sorted(modules.items()) for suffix, t in parts.items()}
    tensors.update(extra or {})
    tensors.update({f"{prefix}{m}.{n}": t for m, state in sorted(modules_to_save.items()) for n, t in state.items()})
    # Own contiguous CPU copies: safetensors refuses views that share storage (e.g. slices of slot tensors).
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / SAFETENSORS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def alpha_for(scale: float, r: int, use_rslora: bool = False) -> int | float:
    """The alpha that gives `scale` at rank r under PEFT's scaling (alpha / r, or alpha / sqrt(r) with
    rsLoRA). An integer (as people write alpha) when one gives scale to float32 precision, so that a
    scale kept in a float32 tensor (8/3 -> 2.6666667) is saved as the alpha it came from; else the float."""
    root = math.sqrt(r) if use_rslora else r
    alpha = float(scale) * root
    whole = round(alpha)
    return whole if math.isclose(whole / root, scale, rel_tol=1e-6) else alpha


def rank_and_alpha(config: dict, module: str, alpha_key: str = "lora_alpha") -> tuple[int, int | float]:
    """(r, alpha) PEFT gives `module`: the matching rank_pattern / alpha_pattern entry, else the config's
    r and alpha (PEFT's default 8 for either). `alpha_key` names the config's alpha: "lora_alpha" for
    LoRA, "alpha" for LoHa and LoKr."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = pattern_key(ranks, module), pattern_key(alphas, module)
    r = ranks[r_key] if r_key is not None else config.get("r", 8)
    alpha = alphas[a_key] if a_key is not None else config.get(alpha_key, 8)
    return r, alpha


def rank_and_alpha_patterns(ranks: Mapping[str, int], alphas: Mapping[str, int | float]) -> dict:
    """PEFT's r, alpha, rank_pattern and alpha_pattern stating each module's own rank and alpha: the
    most common values as r/alpha, the others by full module path."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "alpha": alpha,
        "rank_pattern": {name: v for name, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {name: v for name, v in sorted(alphas.items()) if v != alpha},
    }
