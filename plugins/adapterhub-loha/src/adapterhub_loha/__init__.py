"""adapterhub-loha: PEFT's LoHa adapters served by adapterhub, as rank r*r low-rank slots.

Installed, it registers the adapter type "loha" (PEFT peft_type "LOHA") through the entry point
group `adapterhub.adapter_types`; `Backbone.load` then reads LoHa directories by themselves.
"""

from __future__ import annotations

from adapterhub import AdapterType, hookimpl

from .loha_type import LohaType
from .slots import LohaSlots, hadamard_low_rank

__version__ = "0.1.0"
__all__ = ["LohaSlots", "LohaType", "__version__", "hadamard_low_rank"]


@hookimpl
def adapter_types() -> list[AdapterType]:
    return [LohaType()]
