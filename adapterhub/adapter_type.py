"""Compatibility: the names outside plugins imported from here before the contract moved to
adapterhub/plugins/ and the module helpers to adapterhub/formats/. Import them from `adapterhub`
and `adapterhub.formats` instead; this module only re-exports them."""

from .formats import (
    Adapter,
    check_shape,
    find_linears,
    is_conv1d,
    is_linear,
    linear_targets,
    linear_weight,
    require_linear,
)
from .plugins import AdapterType, ModuleSlots, Route

__all__ = [
    "Adapter",
    "AdapterType",
    "ModuleSlots",
    "Route",
    "check_shape",
    "find_linears",
    "is_conv1d",
    "is_linear",
    "linear_targets",
    "linear_weight",
    "require_linear",
]
