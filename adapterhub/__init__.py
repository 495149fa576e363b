"""adapterhub: one frozen backbone, many small adapters, hot-swapped while it serves."""

from . import ops
from .ops import backend

__version__ = "0.1.0"
__all__ = ["ops", "backend", "__version__"]
