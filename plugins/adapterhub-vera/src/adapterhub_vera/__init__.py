"""adapterhub-vera: PEFT's VeRA adapters served by adapterhub, as rank-r low-rank slots.

Installed, it registers the adapter type "vera" (PEFT peft_type "VERA") through the entry point
group `adapterhub.adapter_types`; `Backbone.load` then reads VeRA directories by themselves.
"""

from __future__ import annotations

from adapterhub import AdapterType, hookimpl

from .projections import make_projections
from .slots import VeraSlots
from .vera_type import VeraType

__version__ = "0.1.0"
__all__ = ["VeraSlots", "VeraType", "__version__", "make_projections"]


@hookimpl
def adapter_types() -> list[AdapterType]:
    return [VeraType()]
