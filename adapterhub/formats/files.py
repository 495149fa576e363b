"""Reading an adapter directory's files, for every format: the config file as a checked JSON object,
the tensors from safetensors (or, when allowed, a pickle loaded with weights_only=True), every value
floating point and finite. Each problem is an AdapterError naming the file and key.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import jsonschema
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import AdapterError

CONFIG_FILE = "adapter_config.json"  # PEFT's and AdapterHub adapters' config file alike
MAX_CONFIG_BYTES = 16 << 20  # a config is a few KB; more is not a config (and would all be read)
MAX_DEPTH = 32  # levels of nested objects and lists in a config; real ones use 3 or 4


def read_json_object(file: Path, resave: str) -> dict:
    """A config file parsed, which must hold a JSON object; `resave` says how to get a good one.
    Each way it can fail is an AdapterError naming the file and what is wrong with it: it cannot be
    read (permissions, a directory), is too big, is not UTF-8 JSON, or nests deeper than MAX_DEPTH
    (json and jsonschema recurse per level: RecursionError past Python's limit)."""
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise AdapterError(f"{file} cannot be read ({e.strerror}); check that it is a file you may read") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{file} is over {MAX_CONFIG_BYTES >> 20} MiB, too big for a config; {resave}")
    try:
        config = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise AdapterError(f"{file} is nested too deep to parse (over {MAX_DEPTH} levels); {resave}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise AdapterError(f"{file} is not valid JSON ({e}); {resave} or fix the file") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: expected a JSON object, got {type(config).__name__}; {resave}")
    check_depth(config, file, resave)
    return config


def check_depth(config: object, file: str | os.PathLike, fix: str) -> None:
    """An AdapterError if `config` nests objects and lists deeper than MAX_DEPTH (or holds itself):
    checked without recursion, before anything that recurses per level (jsonschema, json.dumps)."""
    stack = [(config, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
        if children and depth > MAX_DEPTH:
            raise AdapterError(f"{file} is nested too deep (over {MAX_DEPTH} levels of objects and lists); {fix}")
        stack.extend((child, depth + 1) for child in children)


def _non_finite(config: object) -> tuple[str, float] | None:
    """The first (dotted key, value) in `config`, at any depth, that is a NaN or infinite float."""
    stack: list[tuple[str, object]] = [("", config)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return key, value
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in reversed(list(items)))
    return None


def check_config(
    config: dict,
    schema: Mapping,
    file: str | os.PathLike,
    fix: str = "fix the config file (or save the adapter again)",
    partial: bool = False,
) -> None:
    """An AdapterError naming the first key of `config` (read from `file`, or what `file` names) that
    breaks the JSON Schema `schema`, or holds a non-finite number; `fix` says what to do. `partial`:
    a config its type completes with defaults (AdapterType.init), so a missing top-level key is fine.
    A config nested deeper than MAX_DEPTH is refused first: jsonschema recurses per level."""
    check_depth(config, file, fix)
    errors = jsonschema.Draft202012Validator(schema).iter_errors(config)
    if partial:
        errors = (e for e in errors if not (e.validator == "required" and not e.absolute_path))
    error = jsonschema.exceptions.best_match(errors)
    if error is not None:
        key = ".".join(map(str, error.absolute_path))
        where = f"{key}: " if key else ""
        message = error.message if len(error.message) <= 300 else error.message[:300] + "... (cut)"
        raise AdapterError(f"{file}: {where}{message}; {fix}")
    found = _non_finite(config)
    if found is not None:
        raise AdapterError(f"{file}: {found[0]} is {found[1]}; it must be a finite number")


def read_tensors(
    directory: Path, allow_pickle: bool, files: tuple[str, str], convert: str = "convert it to safetensors"
) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors and the file they came from: `files` = (safetensors, pickle) names; the
    pickle only when allowed. `convert`: how the library that wrote it saves safetensors instead."""
    safetensors_file, pickle_file = files
    safetensors, pickled = directory / safetensors_file, directory / pickle_file
    for file in (safetensors, pickled):
        if os.path.lexists(file) and not file.is_file():
            raise AdapterError(f"{file} is not a file (a folder, or a broken link); save the adapter again")
    if safetensors.is_file():
        try:
            return load_file(safetensors), safetensors
        except (SafetensorError, OSError) as e:
            raise AdapterError(
                f"{safetensors} is truncated or corrupt ({e}); download or save the adapter again"
            ) from e
    if pickled.is_file() and not allow_pickle:
        raise AdapterError(
            f"{pickled} is a pickle and only {safetensors_file} is loaded by default; pass allow_pickle=True to load "
            f"it with torch.load(weights_only=True) if you trust it, or {convert}"
        )
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
    try:
        finite = torch.isfinite(tensor)
    except (NotImplementedError, RuntimeError):  # float8_e4m3fn has no isfinite
        finite = torch.isfinite(tensor.float())
    if not finite.all():
        bad = int((~finite).sum())
        raise AdapterError(
            f"{file}: {key} has {bad} NaN/inf value(s) of {tensor.numel()}; the adapter diverged or was "
            "corrupted: use an earlier checkpoint"
        )


def preview(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
