"""PEFT's on-disk layout, shared by every PEFT-format type: adapter_config.json + adapter_model.safetensors.

    base_model.model.<module>.<type suffix>     the type's tensors, e.g. ".lora_A.weight", ".ia3_l"
    base_model.model.<saved module>.<param>      full copy of a modules_to_save module (classifier.weight)

`read_peft` returns the config (checked against the type's JSON Schema) and the tensors split by
module and suffix, every value checked finite; `write_peft` writes the same layout. The module-
name rules (target_modules, layers_to_transform, exclude_modules, patterns) are PEFT's own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import jsonschema
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AdapterError

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."  # prompt learning: PEFT's model wraps the transformers model without a tuner
ALL_LINEAR = "all-linear"  # PEFT's shorthand; PEFT itself saves the expanded list


@dataclass
class PeftFiles:
    """A PEFT adapter directory read and split: what a type's reader builds its Adapter from."""

    config: dict
    file: Path  # the tensor file, for error messages
    modules: dict[str, dict[str, torch.Tensor]]  # module path -> {suffix: tensor}
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # the `shared` keys found, e.g. prompt_embeddings


def read_peft(directory: str | os.PathLike, *, peft_types: Iterable[str], suffixes: Iterable[str],
              schema: Mapping, known_keys: Iterable[str] = (), refused: Mapping[str, str] | None = None,
              shared: Iterable[str] = (), prefix: str = PREFIX, allow_pickle: bool = False) -> PeftFiles:
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
    tensors, file = read_tensors(directory, allow_pickle)
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
            "modules_to_save in adapter_config.json")
    if not files.modules and not files.shared:
        raise AdapterError(f"{file}: no tensor ends with {suffixes or sorted(shared)}: this is not a "
                           f"{'/'.join(peft_types)} adapter; re-save it with PEFT")
    files.modules = dict(sorted(files.modules.items()))
    return files


def read_config(directory: Path, peft_types: Iterable[str], schema: Mapping, known_keys: Iterable[str] = ()) -> dict:
    """adapter_config.json parsed and checked: JSON object, peft_type, the type's schema."""
    file = directory / CONFIG_FILE
    if not file.is_file():
        nested = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_FILE}"))
        hint = f"; subfolders with one: {nested}: pass subfolder=" if nested else ""
        raise AdapterError(
            f"no {CONFIG_FILE} in {directory}{hint}; a PEFT adapter directory holds {CONFIG_FILE} and "
            f"{SAFETENSORS_FILE}: pass the directory that save_pretrained wrote")
    config = read_json_object(file, resave="re-save the adapter")
    peft_types = tuple(peft_types)
    if config.get("peft_type") not in peft_types:
        raise AdapterError(f"{file}: peft_type {config.get('peft_type')!r} is not {' or '.join(peft_types)}; "
                           "load it with the adapter type for its peft_type (Backbone.load finds it by itself)")
    check_config(config, schema, file)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), str):
            try:
                re.compile(config[key])
            except re.error as e:
                raise AdapterError(f"{file}: {key} {config[key]!r} is not a valid regular expression ({e}); "
                                   f"fix {CONFIG_FILE}") from e
    unknown = sorted(set(config) - set(known_keys)) if known_keys else []
    if unknown:
        logger.warning("%s: unknown keys %s are kept in the adapter's config but not used "
                       "(probably written by a newer PEFT)", file, unknown)
    return config


def read_json_object(file: Path, resave: str) -> dict:
    """A config file parsed, which must hold a JSON object; `resave` says how to get a good one."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file} is not valid JSON ({e}); {resave} or fix the file") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: expected a JSON object, got {type(config).__name__}; {resave}")
    return config


def check_config(config: dict, schema: Mapping, file: str | os.PathLike) -> None:
    """An AdapterError naming the first key of `config` that breaks the JSON Schema `schema`."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        where = ".".join(map(str, error.absolute_path)) or "the config"
        raise AdapterError(f"{file}: {where}: {error.message}; fix the config file (or save the adapter again)")
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise AdapterError(f"{file}: {key} is {value}; it must be a finite number")


def refuse_features(config: dict, features: Mapping[str, str], file: Path, fix: str) -> None:
    """An AdapterError for the first config key of `features` (key -> what it does) that is switched on."""
    for key, what in features.items():
        value = config.get(key)
        if value and value != "none":
            raise AdapterError(f"{file}: {key}={value!r} ({what}) is not supported yet: {fix}")


def read_tensors(directory: Path, allow_pickle: bool, files: tuple[str, str] = (SAFETENSORS_FILE, PICKLE_FILE),
                 convert: str = "convert it to safetensors") -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors and the file they came from: `files` = (safetensors, pickle) names; the
    pickle only when allowed. `convert`: how the library that wrote it saves safetensors instead."""
    safetensors_file, pickle_file = files
    safetensors, pickled = directory / safetensors_file, directory / pickle_file
    if safetensors.is_file():
        try:
            return load_file(safetensors), safetensors
        except (SafetensorError, OSError) as e:
            raise AdapterError(
                f"{safetensors} is truncated or corrupt ({e}); download or save the adapter again") from e
    if pickled.is_file() and not allow_pickle:
        raise AdapterError(
            f"{pickled} is a pickle and only {safetensors_file} is loaded by default; pass allow_pickle=True to load "
            f"it with torch.load(weights_only=True) if you trust it, or {convert}")
    if pickled.is_file():
        try:
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
            raise AdapterError(f"{pickled} could not be loaded with weights_only=True ({e}); save it again") from e
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterError(f"{pickled}: expected a dict of tensors, got {type(tensors).__name__}; save it again")
        return tensors, pickled
    raise AdapterError(f"no {safetensors_file} (or {pickle_file}) in {directory}: the adapter's weights are missing")


def check_values(file: Path, key: str, tensor: torch.Tensor) -> None:
    """Floating point and finite: a NaN/inf would silently poison every output it touches."""
    if not tensor.is_floating_point():
        raise AdapterError(f"{file}: {key} has dtype {tensor.dtype}, expected a floating-point tensor")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterError(
            f"{file}: {key} has {bad} NaN/inf value(s) of {tensor.numel()}; the adapter diverged or was "
            "corrupted: use an earlier checkpoint")


def write_peft(directory: str | os.PathLike, config: dict, modules: Mapping[str, Mapping[str, torch.Tensor]],
               modules_to_save: Mapping[str, Mapping[str, torch.Tensor]],
               extra: Mapping[str, torch.Tensor] | None = None, prefix: str = PREFIX) -> None:
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


def rank_and_alpha_patterns(ranks: Mapping[str, int], alphas: Mapping[str, int | float]) -> dict:
    """PEFT's r, alpha, rank_pattern and alpha_pattern stating each module's own rank and alpha: the
    most common values as r/alpha, the others by full module path."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "alpha": alpha, "rank_pattern": {name: v for name, v in sorted(ranks.items()) if v != r},
            "alpha_pattern": {name: v for name, v in sorted(alphas.items()) if v != alpha}}


def preview(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# --- PEFT's rules for matching module names (peft.utils.other, peft.tuners.tuners_utils) ---------------


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
        "layers_to_transform": {"anyOf": [{"type": "null"}, {"type": "integer"},
                                          {"type": "array", "items": {"type": "integer"}}]},
        "layers_pattern": names_or_regex,
        "fan_in_fan_out": {"type": "boolean"},
    }
