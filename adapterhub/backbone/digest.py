"""An adapter's identity: one sha256 over its config and its tensors, so that two names loaded from
the same files are known to be the same adapter, and a changed byte or config value is not."""

from __future__ import annotations

import hashlib
import json

import torch

from ..formats import Adapter


def adapter_digest(adapter: Adapter) -> str:
    """sha256 hex of the canonical config (json.dumps, keys sorted) and of every tensor, modules and
    then modules_to_save heads, by module path and tensor name sorted: each tensor's name, dtype, shape
    and raw bytes. Hashes the tensors' memory in place when they are contiguous CPU tensors (as read)."""
    h = hashlib.sha256(_canonical(adapter.config))
    for group, modules in (("modules", adapter.modules), ("modules_to_save", adapter.modules_to_save)):
        for path in sorted(modules):
            for key in sorted(modules[path]):
                tensor = modules[path][key]
                h.update(f"\0{group}\0{path}\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
                h.update(_raw(tensor))
    return h.hexdigest()


def _canonical(config: dict) -> bytes:
    """The config as canonical JSON; values JSON cannot hold (an in-memory adapter's) by their repr."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=repr)
    except TypeError:  # keys of mixed types cannot be sorted
        text = repr(config)
    return text.encode("utf-8", "surrogatepass")


def _raw(tensor: torch.Tensor):
    """The tensor's bytes as a buffer: a view of its memory unless it is on a device or strided."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()
