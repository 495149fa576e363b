"""Chooses the backend of the `adapterhub` ops: the compiled extension `adapterhub._C`,
or the pure-PyTorch reference registered under the same schemas.

ADAPTERHUB_FORCE_FALLBACK=1 forces the reference; without a built extension it is
chosen automatically (and the reason is logged).
"""

from __future__ import annotations

import logging
import os

import torch

from . import reference
from .schemas import SCHEMAS

log = logging.getLogger("adapterhub")

_fallback_library: torch.library.Library | None = None


def _register_fallback() -> None:
    global _fallback_library
    _fallback_library = torch.library.Library("adapterhub", "DEF")
    for name, schema in SCHEMAS.items():
        _fallback_library.define(schema)
        _fallback_library.impl(name, getattr(reference, name), "CompositeExplicitAutograd")


def load_backend() -> str:
    """Registers the ops once and returns "compiled" or "fallback"."""
    if os.environ.get("ADAPTERHUB_FORCE_FALLBACK", "0") not in ("", "0"):
        _register_fallback()
        return "fallback"
    try:
        from adapterhub import _C  # (registers the ops with the dispatcher)
    except ImportError as error:
        log.info("adapterhub._C is not built (%s); using the pure-PyTorch fallback", error)
        _register_fallback()
        return "fallback"
    missing = [name for name in SCHEMAS if not hasattr(torch.ops.adapterhub, name)]
    if missing:  # the namespace is taken now: the fallback cannot take over
        raise ImportError(
            f"{_C.__file__} was built from older sources: it lacks the ops {missing}; rebuild it "
            "(make test, or pip install -e . --no-build-isolation), or delete it to use the pure-PyTorch fallback"
        )
    return "compiled"
