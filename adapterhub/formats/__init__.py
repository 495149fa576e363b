"""Every on-disk adapter format, and what a plugin needs to read and write one.

    Adapter, check_shape                        an adapter in memory (formats/adapter.py)
    CONFIG_FILE, read_json_object, check_config,
    read_tensors, check_values                  a directory's files, checked (formats/files.py)
    read_peft, write_peft, PeftFiles, ...       PEFT's layout, shared by every PEFT type (formats/peft.py)
    is_targeted, pattern_key, linear_targets,
    target_schema, ...                          which modules an adapter adapts (formats/targets.py)
    read_peft_lora, write_peft_lora             PEFT's LoRA/DoRA format (formats/peft_lora.py)
    read_bottleneck, write_bottleneck           AdapterHub adapters' bottleneck format (formats/bottleneck.py)

Formats import no other part of adapterhub but its errors: they know files and tensors, not models'
slots. A plugin imports the contract from `adapterhub` and these helpers from `adapterhub.formats`.
The bottleneck format loads on first use (it reads transformers' table of activations).
"""

from .adapter import Adapter, check_shape
from .files import CONFIG_FILE, check_config, check_values, read_json_object, read_tensors
from .peft import (
    PICKLE_FILE,
    PREFIX,
    PROMPT_PREFIX,
    SAFETENSORS_FILE,
    PeftFiles,
    alpha_for,
    rank_and_alpha,
    rank_and_alpha_patterns,
    read_config,
    read_peft,
    refuse_features,
    write_peft,
)
from .peft_lora import lora_scale, read_peft_lora, write_peft_lora
from .targets import (
    ALL_LINEAR,
    find_linears,
    is_conv1d,
    is_linear,
    is_targeted,
    linear_targets,
    linear_weight,
    matches,
    pattern_key,
    require_linear,
    saved_module,
    target_schema,
)

__all__ = [
    "ALL_LINEAR",
    "CONFIG_FILE",
    "PICKLE_FILE",
    "PREFIX",
    "PROMPT_PREFIX",
    "SAFETENSORS_FILE",
    "Adapter",
    "PeftFiles",
    "alpha_for",
    "check_config",
    "check_shape",
    "check_values",
    "find_linears",
    "is_conv1d",
    "is_linear",
    "is_targeted",
    "linear_targets",
    "linear_weight",
    "lora_scale",
    "matches",
    "pattern_key",
    "rank_and_alpha",
    "rank_and_alpha_patterns",
    "read_bottleneck",
    "read_config",
    "read_json_object",
    "read_peft",
    "read_peft_lora",
    "read_tensors",
    "refuse_features",
    "require_linear",
    "saved_module",
    "target_schema",
    "write_bottleneck",
    "write_peft",
    "write_peft_lora",
]


def __getattr__(name: str):
    if name in ("read_bottleneck", "write_bottleneck"):
        from . import bottleneck

        return getattr(bottleneck, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
