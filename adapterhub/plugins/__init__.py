"""The adapter-type contract and the registry that finds its plugins.

contract.py    AdapterType, ModuleSlots, Route: what a plugin implements
low_rank.py    LowRankSlots: slots for any type whose delta is low-rank, on the gathered ops
hookspecs.py   the two pluggy hooks (adapter_types, recognize_adapter) and `hookimpl`
registry.py    the registry: entry-point plugins (built-ins too), env-var filters, failures, listing
"""

from .contract import AdapterType, ModuleSlots, Route
from .hookspecs import hookimpl
from .low_rank import LowRankSlots
from .registry import GROUP, PluginFailure, Registry, TypeListing, get_type, registry

__all__ = [
    "GROUP",
    "AdapterType",
    "LowRankSlots",
    "ModuleSlots",
    "PluginFailure",
    "Registry",
    "Route",
    "TypeListing",
    "get_type",
    "hookimpl",
    "registry",
]
