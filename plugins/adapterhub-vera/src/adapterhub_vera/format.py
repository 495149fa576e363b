"""PEFT's VeRA format (peft_type "VERA"), read into and written from an `adapterhub.Adapter`.

Keys on disk (peft/tuners/vera/{layer,model}.py), for a module (out, in) and rank r:
    base_model.model.<module>.vera_lambda_b   (out,)          trained, per module
    base_model.model.<module>.vera_lambda_d   (r,)            trained, per module
    base_model.vera_A                         (r, max_in)     frozen random, shared (save_projection=True)
    base_model.vera_B                         (max_out, r)    frozen random, shared
A module uses vera_A[:, :in] and vera_B[:out]. In the Adapter each module holds its two lambdas
and the shared vera_A and vera_B: the same two tensor objects in every module, stored once.
A file saved with save_projection=False has no projections; `VeraType.check` regenerates them
from projection_prng_key, as PEFT does on load (it needs the model's sizes: projections.py).

`adapterhub.formats.read_peft` reads both files with PEFT's rules (config, safetensors or
.bin, finite values, modules_to_save), the shared projections as whole `shared=` keys; this module
adds VeRA's own checks and writes through `write_peft(extra=...)`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from adapterhub import Adapter, AdapterError
from adapterhub.formats import CONFIG_FILE, PREFIX, is_targeted, read_peft, target_schema, write_peft

log = logging.getLogger("adapterhub")

PEFT_TYPES = ("VERA",)
LAMBDAS = ("vera_lambda_b", "vera_lambda_d")
SHARED = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}  # Adapter name -> key on disk
DEFAULT_R = 256  # VeraConfig's default

_NUMBER = {"type": "number"}
SCHEMA = {
    "type": "object",
    "properties": {
        "r": {"type": "integer", "minimum": 1, "description": "rank of the shared projections; <= max_rank"},
        "projection_prng_key": {"type": "integer", "description": "seed of the projections when they are not saved"},
        "save_projection": {"type": "boolean"},
        "d_initial": {**_NUMBER, "description": "init only: the value lambda_d starts at"},
        "vera_dropout": {**_NUMBER, "description": "training only: no effect on inference"},
        "bias": {"enum": ["none", "all", "vera_only"], "description": "only 'none' is supported"},
        "init_weights": {"type": "boolean"},
        **target_schema(),
    },
}


def read_peft_vera(directory: str | os.PathLike, *, allow_pickle: bool = False) -> Adapter:
    """Reads and checks the PEFT VeRA adapter in directory; every problem is an AdapterError naming file and key."""
    files = read_peft(
        directory,
        peft_types=PEFT_TYPES,
        suffixes=[f".{n}" for n in LAMBDAS],
        schema=SCHEMA,
        shared=SHARED.values(),
        allow_pickle=allow_pickle,
    )
    config, file, shared = files.config, files.file, files.shared
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{file.parent / CONFIG_FILE}: bias={config['bias']!r} trains the backbone's own biases, which adapterhub "
            "does not swap per adapter; re-train with bias='none', or merge the adapter into the model with PEFT's "
            "merge_and_unload()"
        )
    if not files.modules:
        raise AdapterError(
            f"{file}: no tensor ends with .vera_lambda_b or .vera_lambda_d: this is not a VeRA "
            "adapter; re-save it with PEFT"
        )
    modules = {module: {suffix[1:]: t for suffix, t in parts.items()} for module, parts in files.modules.items()}
    r = config.get("r", DEFAULT_R)
    for module, parts in modules.items():
        _check_module(config, file, module, parts, r)
    if config.get("save_projection", True):
        missing = [key for key in SHARED.values() if key not in shared]
        if missing:
            raise AdapterError(
                f"{file}: save_projection is true but {missing} are missing (PEFT refuses this file too); save the "
                "adapter again with PEFT, or set save_projection to false in adapter_config.json to regenerate them "
                f"from projection_prng_key={config.get('projection_prng_key', 0)} as PEFT would"
            )
        vera_A, vera_B = shared[SHARED["vera_A"]], shared[SHARED["vera_B"]]
        _check_projections(file, vera_A, vera_B, r, max(parts["vera_lambda_b"].size(0) for parts in modules.values()))
        modules = {module: {**parts, "vera_A": vera_A, "vera_B": vera_B} for module, parts in modules.items()}
    elif shared:
        log.warning(
            "%s: save_projection is false, so the saved %s are ignored and regenerated from "
            "projection_prng_key, as PEFT does",
            file,
            sorted(shared),
        )
    return Adapter(
        type="vera", config=config, modules=modules, modules_to_save=files.modules_to_save, source=str(directory)
    )


def write_peft_vera(adapter: Adapter, directory: str | os.PathLike) -> None:
    """Writes adapter as PEFT's save_pretrained does with save_projection=True, loadable by
    PeftModel.from_pretrained; target_modules lists the module paths exactly."""
    vera_A, vera_B = shared_projections(adapter)
    kept = {k: v for k, v in adapter.config.items() if k != "exclude_modules"}  # not a field of peft 0.21's VeraConfig
    config = {
        **kept,
        "peft_type": "VERA",
        "r": vera_A.size(0),
        "save_projection": True,
        "target_modules": sorted(adapter.modules),
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": sorted(adapter.modules_to_save) or None,
    }
    modules = {module: {f".{name}": parts[name] for name in LAMBDAS} for module, parts in adapter.modules.items()}
    write_peft(
        directory, config, modules, adapter.modules_to_save, extra={SHARED["vera_A"]: vera_A, SHARED["vera_B"]: vera_B}
    )


def shared_projections(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(vera_A, vera_B) of the adapter: one pair, the same in every module, as PEFT has one per adapter."""
    first = next(iter(adapter.modules.values()))
    if "vera_A" not in first:
        raise AdapterError(
            f"{adapter.source}: the VeRA adapter has no vera_A/vera_B yet: it was saved with save_projection=False "
            "and its projections are regenerated from projection_prng_key for a model; load it into a Backbone "
            "(or call VeraType().check(adapter, model)) before writing it"
        )
    pair = first["vera_A"], first["vera_B"]
    for module, parts in adapter.modules.items():
        for name, shared in zip(SHARED, pair):
            t = parts.get(name)
            if t is None or not (t is shared or (t.shape == shared.shape and torch.equal(t, shared))):
                raise AdapterError(
                    f"{adapter.source}: module {module} has another {name} than module {next(iter(adapter.modules))}; "
                    "a VeRA adapter has one shared vera_A and vera_B, which every module slices: give every module "
                    "the same tensors"
                )
    return pair


def _check_module(config: dict, file: Path, module: str, parts: dict[str, torch.Tensor], r: int) -> None:
    """Both lambdas, 1-D, lambda_d of the config's r, and a module PEFT would adapt."""
    key = f"{PREFIX}{module}"
    missing = [name for name in LAMBDAS if name not in parts]
    if missing:
        raise AdapterError(
            f"{file}: {key} has {sorted(parts)} but not {missing}; a VeRA module needs vera_lambda_b "
            "(out,) and vera_lambda_d (r,): save the adapter again"
        )
    shapes = {name: tuple(parts[name].shape) for name in LAMBDAS}
    if any(len(shape) != 1 or 0 in shape for shape in shapes.values()):
        raise AdapterError(
            f"{file}: {key} has lambdas of shapes {shapes}, expected 1-D non-empty (out,) and (r,); "
            "empty or flattened tensors mean ZeRO-3/FSDP shards saved without gathering: save again"
        )
    if shapes["vera_lambda_d"] != (r,):
        raise AdapterError(
            f"{file}: {key}.vera_lambda_d has shape {shapes['vera_lambda_d']} but adapter_config.json "
            f"gives r={r}; set r to {shapes['vera_lambda_d'][0]} (or save the adapter again)"
        )
    if not is_targeted(config, module):
        raise AdapterError(
            f"{file}: module {module} has VeRA tensors but target_modules/layers_to_transform/exclude_modules in "
            f"{CONFIG_FILE} do not select it, so PEFT would ignore them; add it to target_modules or drop them"
        )


def _check_projections(file: Path, vera_A: torch.Tensor, vera_B: torch.Tensor, r: int, max_out: int) -> None:
    """vera_A (r, max_in) and vera_B (>= every lambda_b's out, r); the model checks max_in (VeraType.check)."""
    if vera_A.ndim != 2 or vera_A.size(0) != r or vera_B.ndim != 2 or vera_B.size(1) != r or vera_B.size(0) < max_out:
        raise AdapterError(
            f"{file}: {SHARED['vera_A']} has shape {tuple(vera_A.shape)} and {SHARED['vera_B']} "
            f"{tuple(vera_B.shape)}; expected (r={r}, max in) and (max out >= {max_out}, r={r}) for r in "
            f"{CONFIG_FILE} and the largest vera_lambda_b: save the adapter again"
        )
