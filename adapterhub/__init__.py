"""adapterhub: one frozen backbone, many small adapters of any type, hot-swapped while it serves.

The public API, and all an adapter-type plugin may import besides `adapterhub.formats`:

    Backbone, AdapterInfo, Composition,
    RoutingBuffers                                 the runtime (adapterhub/backbone/)
    Adapter, AdapterType, ModuleSlots, Route,
    LowRankSlots, hookimpl, check_shape            the adapter-type contract (adapterhub/plugins/)
    AdapterError, NoFreeSlot                       errors (adapterhub/errors.py)
    ops, backend                                   the gathered low-rank ops (adapterhub/ops/)
"""

from . import ops
from .backbone import AdapterInfo, Backbone, Composition
from .backbone.routing import RoutingBuffers
from .errors import AdapterError, NoFreeSlot
from .formats import Adapter, check_shape
from .ops import backend
from .plugins import AdapterType, LowRankSlots, ModuleSlots, Route, hookimpl

__version__ = "0.1.0"
__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterInfo",
    "AdapterType",
    "Backbone",
    "Composition",
    "LowRankSlots",
    "ModuleSlots",
    "NoFreeSlot",
    "Route",
    "RoutingBuffers",
    "__version__",
    "backend",
    "check_shape",
    "hookimpl",
    "ops",
]
