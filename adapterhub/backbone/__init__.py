"""The Backbone and its runtime parts.

backbone.py     Backbone: load, use, swap, unload, pin, info, save, create, training
slot_table.py   SlotTable: name -> slot, LRU order, pins, batches in flight
routing.py      Routing: the batch in flight, one Route per type and ALL_ROWS; the hooks into ModuleSlots
heads.py        HeadSlots: per-slot copies of modules_to_save heads
host_cache.py   HostCache: evicted adapters kept in host memory, bounded in bytes
trainable.py    Trainable: resident adapters made trainable in their slots
"""

from .backbone import AdapterInfo, Backbone

__all__ = ["AdapterInfo", "Backbone"]
