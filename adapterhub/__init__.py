"""adapterhub: one frozen backbone, many small adapters, hot-swapped while it serves."""

from . import ops
from .backbone import AdapterInfo, Backbone
from .errors import AdapterError
from .ops import backend

__version__ = "0.1.0"
__all__ = ["AdapterError", "AdapterInfo", "Backbone", "backend", "ops", "__version__"]
