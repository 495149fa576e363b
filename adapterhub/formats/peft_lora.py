"""PEFT's LoRA adapter format, read and written: adapter_config.json + adapter_model.safetensors.

A directory that PEFT's `save_pretrained` wrote is read into a `LoraAdapter` and checked completely
(config, every key, shape, rank and value) before anything is returned; `write_peft_lora` writes one
that `peft.PeftModel.from_pretrained` loads with the same ranks and scales. peft itself is not used.

Keys on disk (PEFT removes the adapter name; "base_model.model." is PEFT's wrapper prefix):
    base_model.model.<module>.lora_A.weight          (r, in)     Linear and Conv1D alike
    base_model.model.<module>.lora_B.weight          (out, r)
    base_model.model.<module>.lora_magnitude_vector  (out,)      DoRA only
    base_model.model.<saved module>.<param>          full copy of a modules_to_save module, e.g.
        classifier.weight (in a live PEFT model: classifier.modules_to_save.default.weight)
Scale of a module: alpha / r, or alpha / sqrt(r) with use_rslora, where r and alpha come from
rank_pattern / alpha_pattern when one of their keys matches the module (PEFT's get_pattern_key).
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
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AdapterError

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
SUPPORTED_TYPES = ("LORA",)
ALL_LINEAR = "all-linear"  # PEFT's shorthand; PEFT itself saves the expanded list

# Suffix of a key -> the LoraModule field it fills.
_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude"}
_EMBEDDING_SUFFIXES = (".lora_embedding_A", ".lora_embedding_B")

# The fields of peft 0.21.2's LoraConfig; other keys are kept in LoraAdapter.config with a warning.
KNOWN_KEYS = frozenset("""
    alora_invocation_tokens alpha_pattern arrow_config auto_mapping base_model_name_or_path bias corda_config
    ensure_weight_tying eva_config exclude_modules fan_in_fan_out inference_mode init_lora_weights kasa_config
    layer_replication layers_pattern layers_to_transform loftq_config lora_alpha lora_bias lora_dropout
    lora_ga_config megatron_config megatron_core modules_to_save monteclora_config peft_type peft_version
    qalora_group_size r rank_pattern revision runtime_config target_modules target_parameters task_type
    trainable_token_indices use_bdlora use_dora use_qalora use_rslora velora_config
""".split())

# Config features that change PEFT's forward beyond LoRA/DoRA: refused unless off (None/False/"none"/empty).
_UNSUPPORTED = {
    "bias": "trains the backbone's own biases",
    "lora_bias": "adds a bias to lora_B",
    "use_qalora": "QA-LoRA input pooling",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on nn.Parameter",
    "layer_replication": "replicated layers",
}


@dataclass
class LoraModule:
    """One adapted Linear/Conv1D: delta(x) = scale * (x @ A.T) @ B.T (DoRA: rescaled by magnitude)."""

    A: torch.Tensor  # (r, in)  = PEFT lora_A.weight
    B: torch.Tensor  # (out, r) = PEFT lora_B.weight
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora, after rank_pattern/alpha_pattern
    magnitude: torch.Tensor | None = None  # (out,) DoRA lora_magnitude_vector, else None


@dataclass
class LoraAdapter:
    """A LoRA adapter as PEFT saves it, with module paths relative to the model given to peft."""

    config: dict  # adapter_config.json as read (unknown keys kept)
    modules: dict[str, LoraModule]  # e.g. "model.layers.0.self_attn.q_proj" -> LoraModule
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # path -> state dict
    source: str = ""  # the directory, for error messages
    fan_in_fan_out: bool = False  # base weight stored (in, out), as GPT-2's Conv1D; A and B are not transposed
    use_dora: bool = False

    @property
    def rank(self) -> int:
        """The largest r over the modules (the slot width this adapter needs)."""
        return max((m.A.shape[0] for m in self.modules.values()), default=0)

    def nbytes(self) -> int:
        """Bytes of all tensors: what a load or swap moves."""
        tensors = [t for m in self.modules.values() for t in (m.A, m.B, m.magnitude) if t is not None]
        tensors += [t for sd in self.modules_to_save.values() for t in sd.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


# --- PEFT's rules for matching module names (peft.utils.other, peft.tuners.tuners_utils) ---------------


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first rank_pattern/alpha_pattern key whose regex matches a dotted suffix of module, or None."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / sqrt(r) with rsLoRA, else alpha / r."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def rank_and_alpha(config: dict, module: str) -> tuple[int, float]:
    """(r, lora_alpha) PEFT gives module: the matching rank_pattern/alpha_pattern entry, else r/lora_alpha."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, alpha_key = pattern_key(ranks, module), pattern_key(alphas, module)
    r = ranks[r_key] if r_key is not None else config.get("r", 8)
    alpha = alphas[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    return r, alpha


def is_targeted(config: dict, module: str) -> bool:
    """Whether PEFT puts a LoRA layer on module (check_target_module_exists).

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


# --- reading -----------------------------------------------------------------------------------------


def read_peft_lora(directory: str | os.PathLike, *, allow_pickle: bool = False) -> LoraAdapter:
    """Read and check the PEFT LoRA adapter in directory; every problem is an AdapterError.

    Safetensors only unless allow_pickle=True, which loads a legacy adapter_model.bin with
    torch.load(weights_only=True). Tensors keep their dtype and stay on the CPU.
    """
    directory = Path(directory)
    config = _read_config(directory)
    use_dora = bool(config.get("use_dora", False))
    tensors, file = _read_tensors(directory, allow_pickle)
    for key, tensor in tensors.items():
        _check_values(file, key, tensor)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            unexpected.append(key)
            continue
        path = key.removeprefix(PREFIX)
        if path.endswith(_EMBEDDING_SUFFIXES):
            raise AdapterError(
                f"{file}: {key} is an embedding LoRA (lora_embedding_A/B), which adapterhub does not support yet; "
                "re-train the adapter without the embedding layer in target_modules")
        suffix = next((s for s in _LORA_SUFFIXES if path.endswith(s)), None)
        if suffix is not None:
            parts.setdefault(path.removesuffix(suffix), {})[_LORA_SUFFIXES[suffix]] = tensor
        elif (owner := saved_module(path, config.get("modules_to_save") or [])) is not None:
            saved.setdefault(owner, {})[path.removeprefix(owner + ".")] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise AdapterError(
            f"{file}: {len(unexpected)} unexpected key(s) {_preview(unexpected)}; expected "
            f"'{PREFIX}<module>.lora_A.weight', '.lora_B.weight', '.lora_magnitude_vector' or a parameter of a "
            f"module in modules_to_save ({config.get('modules_to_save')}): remove them or list their module in "
            "modules_to_save in adapter_config.json")
    if not parts:
        raise AdapterError(f"{file}: no lora_A/lora_B tensors: this is not a LoRA adapter; re-save it with PEFT")

    modules = {m: _module(config, file, m, p, use_dora) for m, p in sorted(parts.items())}
    return LoraAdapter(config=config, modules=modules, modules_to_save=saved, source=str(directory),
                       fan_in_fan_out=bool(config.get("fan_in_fan_out", False)), use_dora=use_dora)


def _read_config(directory: Path) -> dict:
    """adapter_config.json, parsed and checked (peft_type, types, unsupported features)."""
    file = directory / CONFIG_FILE
    if not file.is_file():
        nested = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_FILE}"))
        hint = f"; subfolders with one: {nested}: pass subfolder=" if nested else ""
        raise AdapterError(
            f"no {CONFIG_FILE} in {directory}{hint}; a PEFT adapter directory holds {CONFIG_FILE} and "
            f"{SAFETENSORS_FILE}: pass the directory that save_pretrained wrote")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file} is not valid JSON ({e}); re-save the adapter or fix the file") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: expected a JSON object, got {type(config).__name__}; re-save the adapter")
    _check_config(config, file)
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        logger.warning("%s: unknown keys %s are kept in LoraAdapter.config but not used "
                       "(probably written by a newer PEFT)", file, unknown)
    return config


def _check_config(config: dict, file: Path) -> None:
    """Refuse what adapterhub cannot run exactly as PEFT does, naming the key and the fix."""
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_TYPES:
        raise AdapterError(
            f"{file}: peft_type {peft_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)} "
            "(other adapter types come with plugins)")
    for key, what in _UNSUPPORTED.items():
        value = config.get(key)
        if value and value != "none":
            raise AdapterError(
                f"{file}: {key}={value!r} ({what}) is not supported yet; only LoRA and DoRA are: re-train "
                f"without {key}, or merge the adapter into the model with PEFT's merge_and_unload()")
    for key, (ok, expected) in _TYPES.items():
        if key in config and not ok(config[key]):
            raise AdapterError(f"{file}: {key} must be {expected}, got {config[key]!r}; fix {CONFIG_FILE}")
    regexes = [*(config.get("rank_pattern") or {}), *(config.get("alpha_pattern") or {})]
    regexes += [config["target_modules"]] if isinstance(config.get("target_modules"), str) else []
    for regex in regexes:
        try:
            re.compile(regex)
        except re.error as e:
            raise AdapterError(f"{file}: {regex!r} is not a valid regular expression ({e}); fix {CONFIG_FILE}") from e


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (_is_number, "a number"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict) and all(_is_int(r) and r > 0 for r in v.values()),
                     "an object of positive integers"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict) and all(map(_is_number, v.values())),
                      "an object of numbers"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "a list of names or a regex"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "a list of names or a regex"),
    "modules_to_save": (lambda v: v is None or _is_str_list(v), "a list of module names"),
    "layers_to_transform": (lambda v: v is None or _is_int(v) or isinstance(v, list) and all(map(_is_int, v)),
                            "an integer or a list of integers"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "a name or a list of names"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
}


def _read_tensors(directory: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors and the file they came from: safetensors, or .bin when allowed."""
    safetensors, pickled = directory / SAFETENSORS_FILE, directory / PICKLE_FILE
    if safetensors.is_file():
        try:
            return load_file(safetensors), safetensors
        except (SafetensorError, OSError) as e:
            raise AdapterError(
                f"{safetensors} is truncated or corrupt ({e}); download or save the adapter again") from e
    if pickled.is_file() and not allow_pickle:
        raise AdapterError(
            f"{pickled} is a pickle and only {SAFETENSORS_FILE} is loaded by default; pass allow_pickle=True to load "
            "it with torch.load(weights_only=True) if you trust it, or convert it to safetensors")
    if pickled.is_file():
        try:
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
            raise AdapterError(f"{pickled} could not be loaded with weights_only=True ({e}); save it again") from e
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterError(f"{pickled}: expected a dict of tensors, got {type(tensors).__name__}; save it again")
        return tensors, pickled
    raise AdapterError(f"no {SAFETENSORS_FILE} (or {PICKLE_FILE}) in {directory}: the adapter's weights are missing")


def _check_values(file: Path, key: str, tensor: torch.Tensor) -> None:
    """Floating point and finite: a NaN/inf would silently poison every output it touches."""
    if not tensor.is_floating_point():
        raise AdapterError(f"{file}: {key} has dtype {tensor.dtype}, expected a floating-point tensor")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterError(
            f"{file}: {key} has {bad} NaN/inf value(s) of {tensor.numel()}; the adapter diverged or was "
            "corrupted: use an earlier checkpoint")


def _module(config: dict, file: Path, module: str, parts: dict[str, torch.Tensor], use_dora: bool) -> LoraModule:
    """One module's tensors checked against each other and against the config's r, alpha and targets."""
    key = f"{PREFIX}{module}"
    for have, need in (("A", "B"), ("B", "A")):
        if have in parts and need not in parts:
            raise AdapterError(
                f"{file}: {key}.lora_{have}.weight has no {key}.lora_{need}.weight; every LoRA module needs both "
                "lora_A.weight (r, in) and lora_B.weight (out, r): save the adapter again")
    if "A" not in parts:
        raise AdapterError(f"{file}: {key}.lora_magnitude_vector has no lora_A/lora_B; save the adapter again")
    if "magnitude" in parts and not use_dora:
        raise AdapterError(
            f"{file}: {key}.lora_magnitude_vector is a DoRA tensor but use_dora is false; set \"use_dora\": true "
            f"in {CONFIG_FILE} or remove the tensor")
    if use_dora and "magnitude" not in parts:
        raise AdapterError(f"{file}: use_dora is true but {key}.lora_magnitude_vector is missing; save it again")
    _check_shapes(file, module, parts["A"], parts["B"], parts.get("magnitude"))
    r, alpha = rank_and_alpha(config, module)
    if parts["A"].shape[0] != r:
        r_key = pattern_key(config.get("rank_pattern") or {}, module)
        entry = "r" if r_key is None else f"rank_pattern[{r_key!r}]"
        raise AdapterError(
            f"{file}: module {module} has rank {parts['A'].shape[0]} in its tensors but {CONFIG_FILE} gives it "
            f"{entry}={r}; set that entry to {parts['A'].shape[0]} (or save the adapter again)")
    if not is_targeted(config, module):
        raise AdapterError(
            f"{file}: module {module} has LoRA tensors but target_modules/layers_to_transform/exclude_modules in "
            f"{CONFIG_FILE} do not select it, so PEFT would ignore them; add it to target_modules or drop its tensors")
    return LoraModule(A=parts["A"], B=parts["B"], scale=lora_scale(alpha, r, bool(config.get("use_rslora", False))),
                      magnitude=parts.get("magnitude"))


def _check_shapes(file: Path, module: str, A: torch.Tensor, B: torch.Tensor,
                  magnitude: torch.Tensor | None) -> None:
    """A (r, in), B (out, r) with the same r, magnitude (out,); all non-empty."""
    key = f"{PREFIX}{module}"
    if A.ndim != 2 or B.ndim != 2:
        raise AdapterError(
            f"{file}: {key}.lora_A.weight {tuple(A.shape)} / lora_B.weight {tuple(B.shape)}: expected 2-D (r, in) "
            "and (out, r); LoRA on convolutions is not supported yet, and 1-D tensors mean ZeRO-3/FSDP shards "
            "were saved without gathering: gather them and save again")
    if A.numel() == 0 or B.numel() == 0:
        raise AdapterError(f"{file}: {key} has an empty lora_A {tuple(A.shape)} or lora_B {tuple(B.shape)}; "
                           "gather ZeRO-3/FSDP shards and save again")
    r = A.shape[0]
    if B.shape[1] != r:
        raise AdapterError(
            f"{file}: {key}.lora_B.weight has shape {tuple(B.shape)}, expected ({B.shape[0]}, {r}): its rank must "
            f"equal lora_A.weight's {tuple(A.shape)}; save the adapter again")
    if magnitude is not None and tuple(magnitude.shape) != (B.shape[0],):
        raise AdapterError(
            f"{file}: {key}.lora_magnitude_vector has shape {tuple(magnitude.shape)}, expected ({B.shape[0]},) "
            "(one per output feature); save the adapter again")


def _preview(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# --- writing -----------------------------------------------------------------------------------------


def write_peft_lora(adapter: LoraAdapter, directory: str | os.PathLike) -> None:
    """Write adapter as PEFT would: adapter_config.json + adapter_model.safetensors (metadata format=pt).

    The config states the actual ranks and scales: r/lora_alpha are the most common ones, rank_pattern/
    alpha_pattern give the others by full module path, target_modules lists the module paths exactly.
    """
    directory = Path(directory)
    tensors = {}
    for module, m in sorted(adapter.modules.items()):
        _check_shapes(directory / SAFETENSORS_FILE, module, m.A, m.B, m.magnitude)
        if adapter.use_dora != (m.magnitude is not None):
            raise AdapterError(f"{module}: use_dora={adapter.use_dora} but its magnitude is "
                               f"{'missing' if m.magnitude is None else 'set'}; make them agree before saving")
        tensors[f"{PREFIX}{module}.lora_A.weight"] = m.A
        tensors[f"{PREFIX}{module}.lora_B.weight"] = m.B
        if m.magnitude is not None:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = m.magnitude
    for module, state in sorted(adapter.modules_to_save.items()):
        tensors.update({f"{PREFIX}{module}.{name}": t for name, t in state.items()})
    # Own contiguous CPU copies: safetensors refuses views that share storage (e.g. slices of slot tensors).
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}

    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / SAFETENSORS_FILE, metadata={"format": "pt"})
    config = json.dumps(_config_for(adapter), indent=2, sort_keys=True)
    (directory / CONFIG_FILE).write_text(config + "\n", encoding="utf-8")


def _config_for(adapter: LoraAdapter) -> dict:
    """adapter.config with r/alpha/patterns/targets rewritten from the modules themselves."""
    use_rslora = bool(adapter.config.get("use_rslora", False))
    ranks = {name: m.A.shape[0] for name, m in sorted(adapter.modules.items())}
    alphas = {name: _alpha_for(m.scale, ranks[name], use_rslora) for name, m in sorted(adapter.modules.items())}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        **adapter.config,
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {name: v for name, v in ranks.items() if v != r},
        "alpha_pattern": {name: v for name, v in alphas.items() if v != alpha},
        "target_modules": sorted(adapter.modules),
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "modules_to_save": sorted(adapter.modules_to_save) or None,
        "use_rslora": use_rslora,
        "use_dora": adapter.use_dora,
        "fan_in_fan_out": adapter.fan_in_fan_out,
    }


def _alpha_for(scale: float, r: int, use_rslora: bool) -> int | float:
    """The lora_alpha that gives scale at rank r.

    An integer (as people write alpha) when one gives scale to float32 precision, so that a scale kept in a
    float32 tensor (8/3 -> 2.6666667) is saved as the alpha it came from; else the exact float.
    """
    alpha = float(scale) * (math.sqrt(r) if use_rslora else r)
    whole = round(alpha)
    return whole if math.isclose(lora_scale(whole, r, use_rslora), scale, rel_tol=1e-6) else alpha
