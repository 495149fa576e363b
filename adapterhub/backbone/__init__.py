"""The Backbone and its runtime parts.

backbone.py     Backbone: load, use, swap, unload, pin, info, save, create, training
slot_table.py   SlotTable: name -> slot, LRU order, pins, batches in flight
routing.py      Routing: the batch in flight, one Route per type and ALL_ROWS; the hooks into ModuleSlots
heads.py        HeadSlots: per-slot copies of modules_to_save heads
host_cache.py   HostCache: evicted adapters kept in host memory, bounded in bytes
trainable.py    Trainable: resident adapters made trainable in their slots
digest.py       adapter_digest: an adapter's identity, sha256 of its config and tensors
composition.py  Composition: one row's weighted combination of resident adapters (a request's spec)
composer.py     Composer: how compositions run: "cat" routed on the fly, other methods materialized and cached
"""

# For serve/'s Sources, which may import backbone but not hub:
from ..hub import cache_folder, checked_repo_id, checked_source, contain, shown
from .backbone import AdapterInfo, Backbone
from .composition import Composition

__all__ = [
    "AdapterInfo",
    "Backbone",
    "Composition",
    "cache_folder",
    "checked_repo_id",
    "checked_source",
    "contain",
    "shown",
]
