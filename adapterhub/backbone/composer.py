"""The Backbone's compositions: how a row's `Composition` of resident adapters runs.

"cat" (for types whose slots add several (slot, weight) pairs per row) runs on the fly: the row is
routed to every input's slot, each with its weight, and nothing is merged. Every other method is
materialized once by its type's `AdapterType.compose` into a slot of its own, an adapter like any
other (LRU-evicted to the host cache, reloaded from there), cached under a content key: the inputs'
digests, the weights, the method and its options. A swapped or unloaded input changes that key, and
the materializations made from it are dropped. All methods run under the Backbone's lock.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from typing import TYPE_CHECKING

from ..errors import AdapterError
from ..plugins import AdapterType
from .composition import Composition

if TYPE_CHECKING:
    from .backbone import Backbone

log = logging.getLogger("adapterhub")

MATERIALIZED = "composition:"  # the prefix of materializations' resident names, reserved for them
Slots = int | tuple[tuple[int, float], ...]  # one slot (-1: base), or a "cat" row's (slot, weight) pairs


class Composer:
    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.named: dict[str, Composition] = {}  # compositions registered under a name (Backbone.compose)
        self._made: dict[str, tuple[str, tuple[str, ...]]] = {}  # materialization -> (content key, inputs)
        self._generation: dict[str, int] = {}  # input name -> the id of its last in-place change (key part)
        self._changes = itertools.count(1)  # unique per change, so two names' changes never look alike
        self.materialized = 0  # materializations computed (not found resident or in the host cache)
        self.materialize_seconds = 0.0

    def plan(self, composition: Composition) -> tuple[AdapterType, str]:
        """(the inputs' type, the method to use); an AdapterError when they cannot be combined so."""
        bb = self.backbone
        records = [bb._record(name) for name in composition.names]
        types = sorted({r.type for r in records})
        if len(types) > 1:
            raise AdapterError(
                f"the composition of {list(composition.names)} mixes adapter types {types}; "
                "a composition combines adapters of one type"
            )
        adapter_type = bb.types.get(types[0])
        methods = adapter_type.composition_methods()
        if not methods:
            raise AdapterError(
                f"{types[0]} adapters cannot be composed: the {types[0]} type declares no composition "
                "methods (AdapterType.composition_methods)"
            )
        method = composition.method or methods[0]
        if method not in methods:
            raise AdapterError(f'{types[0]} adapters compose by {list(methods)}, not by "{method}"')
        for name, record in zip(composition.names, records):
            if record.heads:
                raise AdapterError(
                    f"{name!r} has its own modules_to_save heads {list(record.heads)}, which cannot be "
                    "combined (PEFT refuses them too); compose adapters without heads"
                )
            if method == "cat" and record.features:
                raise AdapterError(
                    f"{name!r} needs {sorted(record.features)}, which is not a sum of low-rank deltas, so "
                    f'"cat" cannot route it; use another method'
                )
        return adapter_type, method

    def key(self, composition: Composition, method: str) -> str:
        """sha256 hex of the inputs' content digests and weights, the method and its options."""
        bb = self.backbone
        body = {
            "inputs": [[bb._record(n).digest, self._generation.get(n, 0), w] for n, w in composition.adapters],
            "method": method,
            "options": [[k, v] for k, v in composition.options],
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def resolve(self, composition: Composition, pin: bool = False) -> tuple[Slots, str, frozenset[str]]:
        """(slots, type, features) to route a row of `composition` with: a "cat" row's (slot, weight)
        pairs, else the slot of its materialization (made now if it is not resident; `pin` pins it)."""
        bb = self.backbone
        adapter_type, method = self.plan(composition)
        if method == "cat":
            records = [bb._record(n) for n in composition.names]
            scale = adapter_type.cat_scale([r.config for r in records])
            for name in composition.names:
                bb.table.touch(name)
            pairs = tuple((bb.table.slot_of[n], w * scale) for n, w in composition.adapters)
            return pairs, adapter_type.name, frozenset()
        name = self.materialize(composition, adapter_type, method, pin)
        return bb.table.slot_of[name], adapter_type.name, bb._record(name).features

    def materialize(self, composition: Composition, adapter_type: AdapterType, method: str, pin: bool) -> str:
        """The resident name of `composition` merged into one adapter: already resident, back from the
        host cache, or computed from the resident inputs now."""
        bb = self.backbone
        key = self.key(composition, method)
        name = f"{MATERIALIZED}{key[:16]}"
        if name in bb._records:
            bb.table.touch(name)
            if pin:
                bb.table.pinned.add(name)
            self._made[name] = (key, composition.names)
            return name
        source_key = ("composition", key)
        cached = bb.host_cache.pop(source_key)
        if cached is not None:
            adapter, digest = cached
        else:
            start = time.perf_counter()
            inputs = [bb._extract(n) for n in composition.names]
            for input_name, adapter in zip(composition.names, inputs):
                adapter.source = f"adapter {input_name!r}"  # what compose's errors name: never a server path
            adapter = adapter_type.compose(inputs, list(composition.weights), method, dict(composition.options))
            rank = adapter_type.rank(adapter)  # made from checked inputs: only its rank can be new (svd_rank)
            if rank > bb.max_rank:
                raise AdapterError(
                    f"the {method} composition of {list(composition.names)} has rank {rank} > max_rank "
                    f"{bb.max_rank}; ask for svd_rank <= {bb.max_rank}"
                )
            digest = key  # what it computes, named by its inputs' digests (hashing its tensors again costs more)
            self.materialized += 1
            self.materialize_seconds += time.perf_counter() - start
            log.info("materialized %s composition of %s as %r", method, list(composition.names), name)
        label = f"{method} composition of " + ", ".join(f"{n} x {w:g}" for n, w in composition.adapters)
        bb._put(name, label, source_key, adapter, digest, pin)
        self._made[name] = (key, composition.names)
        return name

    def forget_input(self, name: str, unloaded: bool = False) -> None:
        """`name` is being unloaded, swapped, rewritten or trained: materializations made from it are
        stale. Unpinned ones are unloaded now; pinned ones stay for their users and are never found
        again: the key holds the id of `name`'s last change, as its digest may stay (training keeps
        it). `unloaded`: the name is gone, so is that id (loaded again, it holds its files' content)."""
        bb = self.backbone
        if unloaded:
            self._generation.pop(name, None)
        else:
            self._generation[name] = next(self._changes)
        for made, (key, inputs) in list(self._made.items()):
            if name not in inputs:
                continue
            del self._made[made]
            bb.host_cache.take(("composition", key))
            if made in bb._records and made not in bb.table.pinned:
                bb.table.remove(made)
                del bb._records[made]
