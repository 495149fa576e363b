"""adapterhub: one frozen backbone, many small adapters of any type, hot-swapped while it serves."""

from . import ops
from .adapter_type import Adapter, AdapterType, ModuleSlots, Route
from .backbone import AdapterInfo, Backbone
from .errors import AdapterError
from .hookspecs import hookimpl
from .low_rank import LowRankSlots
from .ops import backend

__version__ = "0.1.0"
__all__ = ["Adapter", "AdapterError", "AdapterInfo", "AdapterType", "Backbone", "ModuleSlots", "Route", "backend",
           "hookimpl", "LowRankSlots", "ops", "__version__"]
