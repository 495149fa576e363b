"""PEFT's LoRA format (and DoRA, rsLoRA, rank/alpha patterns), read into and written from an `Adapter`.

Keys on disk (see formats/peft.py for the layout):
    base_model.model.<module>.lora_A.weight          (r, in)     Linear and Conv1D alike
    base_model.model.<module>.lora_B.weight          (out, r)
    base_model.model.<module>.lora_magnitude_vector  (out,)      DoRA only
In the Adapter, each module holds {"A": (r, in), "B": (out, r), "scale": () fp64, "magnitude": (out,) DoRA}.
Scale of a module: alpha / r, or alpha / sqrt(r) with use_rslora, where r and alpha come from
rank_pattern / alpha_pattern when one of their keys matches the module (PEFT's get_pattern_key).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from ..errors import AdapterError
from .adapter import Adapter
from .files import CONFIG_FILE
from .peft import (
    PREFIX,
    SAFETENSORS_FILE,
    alpha_for,
    rank_and_alpha,
    rank_and_alpha_patterns,
    read_peft,
    refuse_features,
    write_peft,
)
from .targets import is_targeted, pattern_key, target_schema

PEFT_TYPES = ("LORA",)
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude"}
_EMBEDDING = (
    "an embedding LoRA (lora_embedding_A/B), which adapterhub does not support yet; re-train the adapter "
    "without the embedding layer in target_modules"
)

# The fields of peft 0.21.2's LoraConfig; other keys are kept in Adapter.config with a warning.
KNOWN_KEYS = frozenset(
    [
        "alora_invocation_tokens",
        "alpha_pattern",
        "arrow_config",
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "corda_config",
        "ensure_weight_tying",
        "eva_config",
        "exclude_modules",
        "fan_in_fan_out",
        "inference_mode",
        "init_lora_weights",
        "kasa_config",
        "layer_replication",
        "layers_pattern",
        "layers_to_transform",
        "loftq_config",
        "lora_alpha",
        "lora_bias",
        "lora_dropout",
        "lora_ga_config",
        "megatron_config",
        "megatron_core",
        "modules_to_save",
        "monteclora_config",
        "peft_type",
        "peft_version",
        "qalora_group_size",
        "r",
        "rank_pattern",
        "revision",
        "runtime_config",
        "target_modules",
        "target_parameters",
        "task_type",
        "trainable_token_indices",
        "use_bdlora",
        "use_dora",
        "use_qalora",
        "use_rslora",
        "velora_config",
    ]
)

_NUMBER = {"type": "number"}
SCHEMA = {
    "type": "object",
    "properties": {
        "r": {"type": "integer", "minimum": 1, "description": "rank of every module without a rank_pattern entry"},
        "lora_alpha": {**_NUMBER, "description": "scale = lora_alpha / r (or / sqrt(r) with use_rslora)"},
        "rank_pattern": {
            "anyOf": [{"type": "null"}, {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}}]
        },
        "alpha_pattern": {"anyOf": [{"type": "null"}, {"type": "object", "additionalProperties": _NUMBER}]},
        "use_rslora": {"type": "boolean"},
        "use_dora": {"type": "boolean"},
        "lora_dropout": _NUMBER,
        **target_schema(),
    },
}

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


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / sqrt(r) with rsLoRA, else alpha / r."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def read_peft_lora(directory: str | os.PathLike, *, allow_pickle: bool = False) -> Adapter:
    """Reads and checks the PEFT LoRA adapter in directory; every problem is an AdapterError."""
    files = read_peft(
        directory,
        peft_types=PEFT_TYPES,
        suffixes=_SUFFIXES,
        schema=SCHEMA,
        known_keys=KNOWN_KEYS,
        refused={".lora_embedding_A": _EMBEDDING, ".lora_embedding_B": _EMBEDDING},
        allow_pickle=allow_pickle,
    )
    config, file = files.config, files.file
    refuse_features(
        config,
        _UNSUPPORTED,
        file,
        "only LoRA and DoRA are: re-train without it, or merge the adapter "
        "into the model with PEFT's merge_and_unload()",
    )
    for regex in [*(config.get("rank_pattern") or {}), *(config.get("alpha_pattern") or {})]:
        try:
            re.compile(regex)
        except re.error as e:
            raise AdapterError(f"{file}: {regex!r} is not a valid regular expression ({e}); fix {CONFIG_FILE}") from e
    modules = {}
    for module, parts in files.modules.items():
        modules[module] = _module(config, file, module, {_SUFFIXES[s]: t for s, t in parts.items()})
    return Adapter(
        type="lora", config=config, modules=modules, modules_to_save=files.modules_to_save, source=str(directory)
    )


def _module(config: dict, file: Path, module: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One module's tensors checked against each other and against the config's r, alpha and targets."""
    use_dora = bool(config.get("use_dora", False))
    key = f"{PREFIX}{module}"
    for have, need in (("A", "B"), ("B", "A")):
        if have in parts and need not in parts:
            raise AdapterError(
                f"{file}: {key}.lora_{have}.weight has no {key}.lora_{need}.weight; every LoRA module needs both "
                "lora_A.weight (r, in) and lora_B.weight (out, r): save the adapter again"
            )
    if "A" not in parts:
        raise AdapterError(f"{file}: {key}.lora_magnitude_vector has no lora_A/lora_B; save the adapter again")
    if "magnitude" in parts and not use_dora:
        raise AdapterError(
            f'{file}: {key}.lora_magnitude_vector is a DoRA tensor but use_dora is false; set "use_dora": true '
            f"in {CONFIG_FILE} or remove the tensor"
        )
    if use_dora and "magnitude" not in parts:
        raise AdapterError(f"{file}: use_dora is true but {key}.lora_magnitude_vector is missing; save it again")
    check_lora_shapes(file, module, parts["A"], parts["B"], parts.get("magnitude"))
    r, alpha = rank_and_alpha(config, module)
    if parts["A"].shape[0] != r:
        r_key = pattern_key(config.get("rank_pattern") or {}, module)
        entry = "r" if r_key is None else f"rank_pattern[{r_key!r}]"
        raise AdapterError(
            f"{file}: module {module} has rank {parts['A'].shape[0]} in its tensors but {CONFIG_FILE} gives it "
            f"{entry}={r}; set that entry to {parts['A'].shape[0]} (or save the adapter again)"
        )
    if not is_targeted(config, module):
        raise AdapterError(
            f"{file}: module {module} has LoRA tensors but target_modules/layers_to_transform/exclude_modules in "
            f"{CONFIG_FILE} do not select it, so PEFT would ignore them; add it to target_modules or drop its tensors"
        )
    scale = torch.tensor(lora_scale(alpha, r, bool(config.get("use_rslora", False))), dtype=torch.float64)
    return {**parts, "scale": scale}


def check_lora_shapes(
    file: Path, module: str, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor | None
) -> None:
    """A (r, in), B (out, r) with the same r, magnitude (out,); all non-empty."""
    key = f"{PREFIX}{module}"
    if A.ndim != 2 or B.ndim != 2:
        raise AdapterError(
            f"{file}: {key}.lora_A.weight {tuple(A.shape)} / lora_B.weight {tuple(B.shape)}: expected 2-D (r, in) "
            "and (out, r); LoRA on convolutions is not supported yet, and 1-D tensors mean ZeRO-3/FSDP shards "
            "were saved without gathering: gather them and save again"
        )
    if A.numel() == 0 or B.numel() == 0:
        raise AdapterError(
            f"{file}: {key} has an empty lora_A {tuple(A.shape)} or lora_B {tuple(B.shape)}; "
            "gather ZeRO-3/FSDP shards and save again"
        )
    r = A.shape[0]
    if B.shape[1] != r:
        raise AdapterError(
            f"{file}: {key}.lora_B.weight has shape {tuple(B.shape)}, expected ({B.shape[0]}, {r}): its rank must "
            f"equal lora_A.weight's {tuple(A.shape)}; save the adapter again"
        )
    if magnitude is not None and tuple(magnitude.shape) != (B.shape[0],):
        raise AdapterError(
            f"{file}: {key}.lora_magnitude_vector has shape {tuple(magnitude.shape)}, expected ({B.shape[0]},) "
            "(one per output feature); save the adapter again"
        )


def write_peft_lora(adapter: Adapter, directory: str | os.PathLike) -> None:
    """Writes adapter as PEFT would. The config states the actual ranks and scales: r/lora_alpha are the
    most common ones, rank_pattern/alpha_pattern give the others by full module path, target_modules
    lists the module paths exactly."""
    directory = Path(directory)
    use_dora = bool(adapter.config.get("use_dora", False))
    modules = {}
    for module, m in sorted(adapter.modules.items()):
        check_lora_shapes(directory / SAFETENSORS_FILE, module, m["A"], m["B"], m.get("magnitude"))
        if use_dora != ("magnitude" in m):
            raise AdapterError(
                f"{module}: use_dora={use_dora} but its magnitude is "
                f"{'set' if 'magnitude' in m else 'missing'}; make them agree before saving"
            )
        modules[module] = {suffix: m[field] for suffix, field in _SUFFIXES.items() if field in m}
    write_peft(directory, _config_for(adapter), modules, adapter.modules_to_save)


def _config_for(adapter: Adapter) -> dict:
    """adapter.config with r/alpha/patterns/targets rewritten from the modules themselves."""
    use_rslora = bool(adapter.config.get("use_rslora", False))
    ranks = {name: m["A"].shape[0] for name, m in adapter.modules.items()}
    patterns = rank_and_alpha_patterns(
        ranks, {name: alpha_for(float(m["scale"]), ranks[name], use_rslora) for name, m in adapter.modules.items()}
    )
    return {
        **adapter.config,
        "peft_type": "LORA",
        "r": patterns["r"],
        "lora_alpha": patterns["alpha"],
        "rank_pattern": patterns["rank_pattern"],
        "alpha_pattern": patterns["alpha_pattern"],
        "target_modules": sorted(adapter.modules),
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "modules_to_save": sorted(adapter.modules_to_save) or None,
        "use_rslora": use_rslora,
        "use_dora": bool(adapter.config.get("use_dora", False)),
        "fan_in_fan_out": bool(adapter.config.get("fan_in_fan_out", False)),
    }
