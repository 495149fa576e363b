"""AdapterHub `adapters`' format for bottleneck adapters: adapter_config.json + adapter.safetensors.

    adapter_config.json  {"config": {BnConfig fields} or a preset name ("seq_bn", "double_seq_bn"),
                          "name": "<name>", "hidden_size", "model_class", "model_name", "model_type",
                          "version": "adapters.1.3.0"}
    adapter.safetensors  <site>.adapters.<name>.adapter_down.0.weight (r, H)   .adapter_down.0.bias (r,)
                         <site>.adapters.<name>.adapter_up.weight     (H, r)   .adapter_up.bias     (H,)
    <site>: a post-norm output block (BERT: `...layer.i.attention.output`, `...layer.i.output`), or a
    decoder layer + `.attention_adapters` / `.output_adapters` (Llama: `model.layers.i.attention_adapters`).

An Adapter read from here keeps, per adapted module (the block, or the decoder layer), the tensors
by the names after `adapters.<name>.` (prefixed with the location inside a decoder layer), plus the
config's settings as tensors, since the slots only see tensors: "scaling" () and "mode" (4,) =
(original_ln_before, original_ln_after, residual (0: before ln, 1: after ln, 2: post_add), activation).
Head files (head_config.json, model_head.safetensors) are not part of the adapter and are ignored.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.activations import ACT2CLS, get_activation

from ..errors import AdapterError
from .adapter import Adapter
from .files import CONFIG_FILE, check_config, check_values, preview, read_json_object, read_tensors

log = logging.getLogger("adapterhub")

WEIGHTS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"
HEAD_FILES = ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin")
# adapterhub's own file beside adapters' ones: full copies of modules_to_save heads (a classifier
# trained with the adapter), keyed "<module path>.<parameter>"; adapters' load_adapter ignores it.
OWN_HEADS_FILE = "adapterhub_heads.safetensors"
VERSION = "adapters.1.3.0"  # the format this module writes
LOCATIONS = ("attention_adapters", "output_adapters")  # a decoder layer's two adapter locations
PARAMS = ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias")
SETTINGS = ("scaling", "mode")  # tensors derived from the config, not written to the file
ACTIVATIONS = tuple(sorted({*ACT2CLS, "leakyrelu"}))  # mode[3] indexes this table
RESIDUAL = {True: 0, False: 1, "post_add": 2}  # residual_before_ln -> mode[2]
LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # adapter-transformers < 3 (no "version")

_NUMBER = {"type": "number"}
_BOOL = {"type": "boolean"}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
BN_SCHEMA = {
    "type": "object",
    "properties": {
        "architecture": {"enum": [None, "bottleneck"]},
        "mh_adapter": _BOOL,
        "output_adapter": _BOOL,
        "reduction_factor": {"anyOf": [_POSITIVE, {"type": "object", "additionalProperties": _POSITIVE}]},
        "non_linearity": {"type": "string"},
        "original_ln_before": _BOOL,
        "original_ln_after": _BOOL,
        "ln_before": _BOOL,
        "ln_after": _BOOL,
        "init_weights": {"enum": ["bert", "mam_adapter", "houlsby"]},
        "init_weights_seed": {"type": ["integer", "null"]},
        "is_parallel": _BOOL,
        "use_gating": _BOOL,
        "cross_adapter": _BOOL,
        "phm_layer": _BOOL,
        "scaling": {"anyOf": [_NUMBER, {"type": "string"}]},
        "residual_before_ln": {"enum": [True, False, "post_add"]},
        "adapter_residual_before_ln": _BOOL,
        "inv_adapter": {"type": ["string", "null"]},
        "leave_out": {"type": "array", "items": {"type": "integer"}},
        "dropout": _NUMBER,
        "stochastic_depth": {"type": ["number", "null"]},
    },
}
PRESETS = {
    "seq_bn": {
        "mh_adapter": False,
        "output_adapter": True,
        "reduction_factor": 16,
        "non_linearity": "relu",
        "original_ln_before": True,
    },
    "double_seq_bn": {
        "mh_adapter": True,
        "output_adapter": True,
        "reduction_factor": 16,
        "non_linearity": "swish",
        "original_ln_before": False,
    },
}
PRESETS.update(pfeiffer=PRESETS["seq_bn"], houlsby=PRESETS["double_seq_bn"])  # adapters' deprecated names
SCHEMA = {
    "type": "object",
    "required": ["config"],
    "properties": {
        "config": {"anyOf": [{"enum": sorted(PRESETS)}, BN_SCHEMA]},
        "name": {"type": "string", "pattern": r"^[^.]+$"},
        "hidden_size": {"type": "integer"},
        "model_class": {"type": ["string", "null"]},
        "model_name": {"type": ["string", "null"]},
        "model_type": {"type": ["string", "null"]},
        "version": {"type": "string"},
    },
}
# BnConfig's defaults for the keys that are not required (mh_adapter, output_adapter, reduction_factor, non_linearity).
DEFAULTS = {
    "original_ln_before": False,
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "init_weights": "bert",
    "init_weights_seed": None,
    "is_parallel": False,
    "scaling": 1.0,
    "use_gating": False,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "cross_adapter": False,
    "leave_out": [],
    "dropout": 0.0,
    "phm_layer": False,
    "phm_dim": 4,
    "factorized_phm_W": True,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "factorized_phm_rule": False,
    "phm_c_init": "normal",
    "phm_init_range": 0.0001,
    "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "phm_rank": 1,
    "phm_bias": True,
    "stochastic_depth": 0.0,
}
REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
# adapter_residual_before_ln only moves the adapter's residual around ln_after's LayerNorm: without
# ln_after (refused below) both values compute the same, so both are accepted.
# Settings this implementation does not compute: key -> (the value it supports, what the setting adds).
REFUSED = {
    "ln_before": (False, "a new LayerNorm before the bottleneck"),
    "ln_after": (False, "a new LayerNorm after the bottleneck"),
    "use_gating": (False, "a learned gate on the adapter output (UniPELT)"),
    "is_parallel": (False, "a parallel adapter (par_bn)"),
    "phm_layer": (False, "PHM projections (Compacter)"),
    "cross_adapter": (False, "adapters after cross-attention"),
}


def resolve_config(config: dict | str, base: dict, file: str | Path, legacy: bool = False) -> dict:
    """The full BnConfig dict of `config` (a preset name, or fields over `base`), every key checked;
    an AdapterError names the first key that is missing, malformed or set to what we do not compute.
    `legacy`: a config without "version" (adapter-transformers < 3), whose activation names differ."""
    if isinstance(config, str) and config not in PRESETS:
        raise AdapterError(
            f"{file}: config {config!r} is not a bottleneck preset; use one of {sorted(PRESETS)} or "
            "a dict of BnConfig fields"
        )
    full = {**DEFAULTS, **base, **(PRESETS[config] if isinstance(config, str) else config)}
    missing = [key for key in REQUIRED if key not in full]
    if missing:
        raise AdapterError(
            f"{file}: config has no {missing}; a bottleneck config needs {list(REQUIRED)} "
            '(or name a preset: "seq_bn", "double_seq_bn")'
        )
    check_config({"config": full}, {"type": "object", "properties": {"config": BN_SCHEMA}}, file)
    full.pop("architecture", None)
    if legacy:
        full["non_linearity"] = LEGACY_ACTIVATIONS.get(full["non_linearity"], full["non_linearity"])
    full["non_linearity"] = full["non_linearity"].lower()
    for key, (supported, what) in REFUSED.items():
        if full[key] != supported:
            raise AdapterError(
                f"{file}: config.{key}={full[key]!r} ({what}) is not supported; only {supported!r} "
                "is: use a seq_bn or double_seq_bn adapter, or another library for this one"
            )
    if isinstance(full["scaling"], str):
        raise AdapterError(
            f"{file}: config.scaling={full['scaling']!r} (a learned scaling) is not supported; only "
            "a constant number is"
        )
    if full["non_linearity"] not in ACTIVATIONS:
        raise AdapterError(
            f"{file}: config.non_linearity={full['non_linearity']!r} is not an activation transformers "
            f"knows; use one of {list(ACTIVATIONS)}"
        )
    return full


@functools.cache
def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function adapters uses for non_linearity `name` (lower case)."""
    return nn.functional.leaky_relu if name == "leakyrelu" else get_activation(name)


def settings(config: dict) -> dict[str, torch.Tensor]:
    """The config's per-adapter settings as the tensors each adapted module carries."""
    mode = [
        int(config["original_ln_before"]),
        int(config["original_ln_after"]),
        RESIDUAL[config["residual_before_ln"]],
        ACTIVATIONS.index(config["non_linearity"]),
    ]
    return {
        "scaling": torch.tensor(float(config["scaling"]), dtype=torch.float64),
        "mode": torch.tensor(mode, dtype=torch.int64),
    }


def is_attention(path: str, tensor: str) -> bool:
    """Whether the tensor belongs to an adapter after the attention block (mh_adapter), not the FFN."""
    return tensor.startswith(LOCATIONS[0] + ".") or re.search(r"(^|\.)attention\.output$", path) is not None


def split_tensor(tensor: str) -> tuple[str, str]:
    """A module's tensor name -> (location in a decoder layer, or "" for a block; the format's param name)."""
    location, _, param = tensor.partition(".")
    return (location, param) if location in LOCATIONS else ("", tensor)


def split_key(key: str, name: str) -> tuple[str, str] | None:
    """`<site>.adapters.<name>.<param>` -> (module path, tensor name), or None for another key."""
    match = re.fullmatch(rf"(.+)\.adapters\.{re.escape(name)}\.(.+)", key)
    if match is None:
        return None
    site, param = match.groups()
    owner, _, location = site.rpartition(".")
    return (owner, f"{location}.{param}") if location in LOCATIONS else (site, param)


def join_key(path: str, tensor: str, name: str) -> str:
    """The inverse of `split_key`."""
    location, param = split_tensor(tensor)
    return f"{path}.{location + '.' if location else ''}adapters.{name}.{param}"


def read_bottleneck(directory: Path, adapter_type: str, allow_pickle: bool) -> Adapter:
    """Reads and checks an adapters bottleneck adapter; every problem is an AdapterError naming file and key."""
    file = directory / CONFIG_FILE
    if not os.path.lexists(file):  # else read_json_object says why it cannot be read
        raise AdapterError(
            f"no {CONFIG_FILE} in {directory}; an adapters bottleneck adapter directory holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}: pass the directory that save_adapter wrote"
        )
    config = read_json_object(file, resave="save the adapter again")
    check_config(config, SCHEMA, file)
    config = {**config, "config": resolve_config(config["config"], {}, file, legacy="version" not in config)}
    tensors, weights = read_tensors(
        directory,
        allow_pickle,
        files=(WEIGHTS_FILE, PICKLE_FILE),
        convert="save it with save_adapter(..., use_safetensors=True)",
    )
    name = config.get("name") or _name_in(tensors, weights)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        if key.startswith("invertible_adapters.") or ".invertible_adapters." in key:
            raise AdapterError(
                f"{weights}: {key}: invertible adapters (inv_adapter, for language adapters) are not "
                "supported; load a task adapter without them"
            )
        found = split_key(key, name)
        if found is None or split_tensor(found[1])[1] not in PARAMS:
            unexpected.append(key)
            continue
        check_values(weights, key, tensor)
        modules.setdefault(found[0], {})[found[1]] = tensor
    if unexpected:
        raise AdapterError(
            f"{weights}: {len(unexpected)} unexpected key(s) {preview(unexpected)}; expected "
            f"'<module>.adapters.{name}.' + one of {list(PARAMS)} (adapter name {name!r} from "
            f"{CONFIG_FILE}): rename the adapter or save it again with adapters"
        )
    if not modules:
        raise AdapterError(f"{weights} holds no tensor: the adapter has no weights; save it again")
    inner = config["config"]
    for path, parts in modules.items():
        _check_site(weights, path, parts, inner, name)
        parts.update(settings(inner))
    if inner["inv_adapter"]:
        log.info(
            "%s: config.inv_adapter=%r but the file has no invertible adapter weights; ignored, as adapters "
            "does for task adapters",
            file,
            inner["inv_adapter"],
        )
    heads = [f for f in HEAD_FILES if (directory / f).is_file()]
    if heads:
        log.info("%s: %s hold a prediction head, which is not part of the adapter: ignored", directory, heads)
    return Adapter(
        type=adapter_type,
        config=config,
        modules=dict(sorted(modules.items())),
        modules_to_save=_read_own_heads(directory),
        source=str(directory),
    )


def _read_own_heads(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """modules_to_save heads from OWN_HEADS_FILE, if the adapter has one: path -> its state dict."""
    if not (directory / OWN_HEADS_FILE).is_file():
        return {}
    tensors, file = read_tensors(directory, False, files=(OWN_HEADS_FILE, OWN_HEADS_FILE))
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        check_values(file, key, tensor)
        path, _, param = key.rpartition(".")
        heads.setdefault(path, {})[param] = tensor
    return heads


def write_bottleneck(adapter: Adapter, directory: Path) -> None:
    """Writes `adapter` as adapters' save_adapter(use_safetensors=True) does, keyed by its module paths."""
    name = adapter.config.get("name") or "bottleneck"
    config = {**adapter.config, "name": name, "version": adapter.config.get("version", VERSION)}
    # Own contiguous CPU copies: safetensors refuses views that share storage (slices of slot tensors).
    tensors = {
        join_key(path, tensor, name): t.detach().to("cpu", copy=True).contiguous()
        for path, parts in sorted(adapter.modules.items())
        for tensor, t in parts.items()
        if tensor not in SETTINGS
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if adapter.modules_to_save:
        heads = {
            f"{path}.{param}": t.detach().to("cpu", copy=True).contiguous()
            for path, state in sorted(adapter.modules_to_save.items())
            for param, t in state.items()
        }
        save_file(heads, directory / OWN_HEADS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _name_in(tensors: dict[str, torch.Tensor], file: Path) -> str:
    """The adapter name in the keys, for a config without "name"."""
    names = {m.group(1) for key in tensors if (m := re.search(r"\.adapters\.([^.]+)\.", key))}
    if len(names) != 1:
        raise AdapterError(
            f'{file}: {CONFIG_FILE} has no "name" and the keys name {sorted(names) or "no"} '
            "adapter(s); add the adapter's name to the config"
        )
    return names.pop()


def _check_site(file: Path, path: str, parts: dict[str, torch.Tensor], config: dict, name: str) -> None:
    """Each location of a module has all four tensors, with consistent shapes, and is one the config places."""
    for location in sorted({split_tensor(tensor)[0] for tensor in parts}):
        prefix = f"{location}." if location else ""
        missing = [p for p in PARAMS if prefix + p not in parts]
        if missing:
            raise AdapterError(
                f"{file}: {join_key(path, prefix + missing[0], name)} is missing (the other tensors of "
                "that adapter are there); save the adapter again"
            )
        down, down_bias, up, up_bias = (parts[prefix + p] for p in PARAMS)
        r, hidden = down.shape if down.ndim == 2 else (-1, -1)
        for param, t, shape in zip(PARAMS, (down, down_bias, up, up_bias), ((r, hidden), (r,), (hidden, r), (hidden,))):
            if r < 1 or tuple(t.shape) != shape:
                raise AdapterError(
                    f"{file}: {join_key(path, prefix + param, name)} has shape {tuple(t.shape)}, "
                    f"expected {shape if r >= 1 else '(r, hidden)'} (adapter_down.0.weight is "
                    f"{tuple(down.shape)}); the file is corrupt: save the adapter again"
                )
        where = "mh_adapter" if is_attention(path, prefix) else "output_adapter"
        if not config[where]:
            raise AdapterError(
                f"{file}: {join_key(path, prefix + PARAMS[0], name)} is an adapter the config does not "
                f"place ({where} is false); fix {CONFIG_FILE} or save the adapter again"
            )
