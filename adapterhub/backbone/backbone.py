"""Backbone: one frozen model, many resident adapters in preallocated slots, routed per row.

    bb = Backbone(model, max_adapters=64, max_rank=64)
    bb.load("org/name", name="support"); bb.load("./legal-lora", name="legal")
    with bb.use(["support", "legal", None]):   # one adapter per row, None = base
        model(ids)

Adapters may be of any installed type (adapterhub/plugins/); one batch may mix them, and a row may be a
weighted composition of several (`Composition`: PEFT's add_weighted_adapter methods, per request).
Loading reads and checks the whole adapter before touching any slot, then copies it into
a free slot (evicting the least recently used unpinned adapter when all are taken). Each
type keeps its own slot tensors on the modules it adapts, allocated once, at construction
for the `preallocate` types on the target modules, else when the first adapter of a type
needs a module. After that nothing in the model is rebuilt or reshaped, so a compiled model
does not recompile. A swap writes the new weights into another slot and then remaps the
name, so a batch in flight finishes on the weights it started with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, NoFreeSlot
from ..formats import CONFIG_FILE, Adapter, check_config, find_linears, read_json_object
from ..hub import resolve
from ..plugins import AdapterType, ModuleSlots, Registry, Route, registry
from .composer import MATERIALIZED, Composer, Slots
from .composition import Composition
from .digest import adapter_digest
from .heads import HeadSlots
from .host_cache import HostCache, source_key
from .routing import ALL_ROWS, Routing, RoutingBuffers, attach, routes_for
from .slot_table import SlotTable
from .trainable import Trainable

log = logging.getLogger("adapterhub")

Row = str | Composition | Mapping | None  # what routes one row: an adapter's name, a composition, the base


@dataclass(frozen=True)
class AdapterInfo:
    """What `Backbone.info` tells about a resident adapter.

    digest: sha256 hex of the adapter as loaded (or added from memory): its canonical config
    (json.dumps, keys sorted) and its tensors (by module path and name sorted: name, dtype, shape, raw
    bytes), computed once when it is read. The same files loaded under two names give the same digest;
    a changed tensor byte or config value gives another. Training in the slots does not change it. A
    materialized composition's digest is its composition key (`Backbone.composition_key`).
    """

    name: str
    type: str
    source: str
    slot: int
    rank: int
    modules: int
    nbytes: int
    pinned: bool
    config: dict
    digest: str = ""


@dataclass
class _Record:
    type: str
    source: str
    source_key: tuple
    config: dict
    rank: int
    modules: tuple[str, ...]
    nbytes: int
    heads: tuple[str, ...]
    features: frozenset[str]
    digest: str


class Backbone:
    """A frozen model serving many adapters, of any installed types, at once. See the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_adapters: int = 16,
        max_rank: int = 16,
        target_modules: Sequence[str] | str | None = None,
        preallocate: Sequence[str] = ("lora",),
        host_cache_bytes: int = 1 << 30,
        types: Registry | None = None,
    ):
        if max_adapters < 1 or max_rank < 1:
            raise ValueError(f"max_adapters and max_rank must be >= 1, got {max_adapters} and {max_rank}")
        self.model = model.requires_grad_(False)
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.types = types or registry()
        self.routing = Routing()
        self.table = SlotTable(max_adapters)
        self.host_cache = HostCache(host_cache_bytes)
        self.evictions = 0  # adapters evicted to make room, since construction
        self._records: dict[str, _Record] = {}
        self._lock = threading.RLock()  # slot table, records, slot modules
        self._steps: Counter[int] = Counter()  # thread -> its training steps in flight (training_step)
        self._steps_ended = threading.Condition(self._lock)
        self._use_lock = threading.Lock()  # one routed batch at a time
        self._use_owner: int | None = None  # the thread inside use()
        self._modules = dict(model.named_modules())  # before our slot modules are attached
        self._module_slots: dict[tuple[str, str], ModuleSlots] = {}  # (type, module path) -> its slot tensors
        self._heads: dict[str, HeadSlots] = {}  # module path -> slot tensors of its modules_to_save copies
        self._hooked: Counter[str] = Counter()  # route key (type, ALL_ROWS) -> modules with its hooks attached
        self._training: dict[str, Trainable] = {}  # name -> the Trainable of the training() block it is in
        self.composer = Composer(self)
        targets = find_linears(model, target_modules)
        for type_name in preallocate:
            adapter_type = self.types.get(type_name)
            for path in targets:
                self._allocate(adapter_type, path)

    # ---- what is resident --------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self.table.slot_of)

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            record = self._record(name)
            return AdapterInfo(
                name=name,
                type=record.type,
                source=record.source,
                slot=self.table.slot_of[name],
                rank=record.rank,
                modules=len(record.modules),
                nbytes=record.nbytes,
                pinned=name in self.table.pinned,
                config=dict(record.config),
                digest=record.digest,
            )

    def pin(self, name: str) -> None:
        """Keeps `name` resident: LRU eviction passes it over until `unpin`."""
        with self._lock:
            self._record(name)
            self.table.pinned.add(name)

    def pinned_count(self) -> int:
        """How many resident adapters are pinned."""
        with self._lock:
            return len(self.table.pinned)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._record(name)
            if name in self._training:
                raise AdapterError(f"{name!r} stays pinned while a training() block trains it; leave the block first")
            self.table.pinned.discard(name)

    def training_step(self) -> Callable[[], None]:
        """Marks a training step in flight: a forward that records gradients, then its backward. Until
        it ends, loads and swaps from other threads wait before writing any slot, since the step's
        slot tensors are clones and autograd keeps the slot tensors it read for the backward.
        Returns the function that ends the step: idempotent, callable from any thread."""
        owner = threading.get_ident()
        with self._lock:
            self._steps[owner] += 1
        ended = False

        def end() -> None:
            nonlocal ended
            with self._steps_ended:
                if not ended:
                    ended = True
                    self._steps[owner] -= 1
                    self._steps_ended.notify_all()

        return end

    # ---- loading -------------------------------------------------------------------------
    def load(
        self,
        source: str | os.PathLike,
        name: str | None = None,
        *,
        type: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        pin: bool = False,
        root: str | os.PathLike | None = None,
    ) -> str:
        """Loads an adapter (local directory or Hub repo id) into a free slot; returns its name.

        Its type is found from the files (PEFT's peft_type, or a plugin's recognize_adapter) unless
        `type` names one. `pin` pins it as it is placed, so that no concurrent load can evict it
        before its first use. `root`: where every file read must resolve (symlinks followed), e.g. a
        server's --adapter-dir (`hub.resolve`); None trusts the files wherever they lead.
        """
        name = name or os.path.basename(os.path.normpath(str(subfolder or source)))
        with self._lock:
            self._check_new_name(name)
        key, adapter, digest = self._fetch(source, type, revision, subfolder, token, cache_dir, allow_pickle, root)
        self._put(name, str(source), key, adapter, digest, pin)
        return name

    def add(self, name: str, adapter: Adapter) -> str:
        """Puts an adapter made in memory (`AdapterType.init`, a trainer's result) into a free slot,
        checked as `load` checks files; returns its name."""
        with self._lock:
            self._check_new_name(name)
        adapter = self.types.get(adapter.type).place(adapter, self.model)
        self._check(adapter)
        self._put(name, adapter.source or "memory", ("memory", name, id(adapter)), adapter, adapter_digest(adapter))
        return name

    def create(self, name: str, type: str = "lora", config: dict | None = None) -> str:
        """A fresh adapter of `type` for this model, initialised as its format's library does (LoRA:
        B = 0, so it starts as the base model), in a free slot, ready to train with `training`.
        config["modules_to_save"] names heads (e.g. ["classifier"]) that the adapter gets its own
        trainable copy of, as PEFT's modules_to_save."""
        adapter_type = self.types.get(type)
        config = dict(config or {})
        check_config(
            config,
            adapter_type.config_schema,
            f"create({name!r}, {type!r}) config",
            fix="fix the config passed to create()",
            partial=True,  # init fills in the defaults; the whole config is checked again when it is placed
        )
        adapter = adapter_type.init(self.model, config)
        for wanted in config.get("modules_to_save") or []:
            found = [p for p in self._modules if p == wanted or p.endswith("." + wanted)]
            if not found:
                raise AdapterError(
                    f"create: modules_to_save names {wanted!r}, which is not a module of "
                    f"{self.model.__class__.__name__}"
                )
            for path in found:
                module = self._modules[path]
                adapter.modules_to_save[path] = {
                    k: p.detach().clone() for k, p in module.named_parameters(recurse=False)
                }
        return self.add(name, adapter)

    @contextlib.contextmanager
    def training(self, names: str | Sequence[str]) -> Iterator[Trainable]:
        """Makes resident adapters trainable in their slots for the block (backbone/trainable.py):
        yields their parameters; forwards that record gradients send each row's gradients to its
        row's adapter only. The adapters are pinned meanwhile, and cannot be swapped or unloaded;
        `save` writes their current values. At the end their trained weights stay in their slots."""
        names = [names] if isinstance(names, str) else list(names)
        with self._lock:
            for name in names:
                self._record(name)
                if name in self._training:
                    raise AdapterError(
                        f"{name!r} is already being trained in another training() block; leave that block first"
                    )
            adapters = {name: self._extract(name) for name in names}
            pinned = {name for name in names if name in self.table.pinned}
            trainable = Trainable(self, adapters)
            for name in names:
                self.table.pinned.add(name)
                self._training[name] = trainable
        hooks = [
            self.model.register_forward_pre_hook(trainable.before_forward, prepend=True),  # before prompts
            self.model.register_forward_hook(trainable.after_forward, always_call=True),
        ]
        try:
            yield trainable
        finally:
            for hook in hooks:
                hook.remove()
            with self._lock:
                try:
                    trainable.restore()
                    trainable.end_step()
                    trainable.sync()
                finally:
                    for name in names:
                        del self._training[name]
                        self._changed_in_place(name)
                        if name not in pinned:
                            self.table.pinned.discard(name)

    def slot_modules(self, name: str) -> list[ModuleSlots]:
        """The slot tensors that hold resident `name`: its type's ModuleSlots on each module it adapts,
        then the HeadSlots of its modules_to_save heads."""
        with self._lock:
            record = self._record(name)
            return [self._module_slots[(record.type, path)] for path in record.modules] + [
                self._heads[path] for path in record.heads
            ]

    def has_slots(self, path: str) -> bool:
        """Whether the module at `path` has slot tensors of any type or a head attached (it did adapt,
        or does: slots stay once allocated), so its forward hooks may run in a batch."""
        with self._lock:
            return path in self._heads or any(p == path for _, p in self._module_slots)

    def virtual_tokens(self, name: str) -> torch.Tensor | None:
        """The (n, dim) input embeddings resident `name` puts before each row's tokens (prompt tuning),
        or None: for a server that places them in a packed sequence itself (`ModuleSlots.virtual_tokens`).
        A view of the slot: valid while `name` is pinned."""
        with self._lock:
            record, slot = self._record(name), self.table.slot_of[name]
            for path in record.modules:
                prefix = self._module_slots[(record.type, path)].virtual_tokens(slot)
                if prefix is not None:
                    return prefix
        return None

    def rewrite(self, name: str, adapter: Adapter) -> None:
        """Writes new values of resident `name`'s tensors (`adapter`: the same modules and shapes, e.g.
        a trainer's parameters) into its slot through the ModuleSlots' own `write`: differentiable
        copies when the tensors require grad, so gradients reach them from the slots."""
        with self._lock:
            record, slot = self._record(name), self.table.slot_of[name]
            self._changed_in_place(name)
            for path in record.modules:
                self._module_slots[(record.type, path)].write(slot, adapter.modules[path])
            for path in record.heads:
                self._heads[path].write(slot, adapter.modules_to_save[path])

    def _changed_in_place(self, name: str) -> None:
        """`name`'s slot now holds other weights than its files (rewritten, trained): what was merged
        from it is stale, and evicted it must not go to the host cache as those files' content."""
        self.composer.forget_input(name)
        if name in self._records:
            self._records[name].source_key = ("memory", name, object())

    def _put(self, name: str, source: str, key: tuple, adapter: Adapter, digest: str, pin: bool = False) -> None:
        with self._placing(key, adapter, digest):
            self._wait_for_training_steps()
            self._check_new_name(name, materialized=key[0] == "composition")
            slot = self._free_slot(name)
            self._write(slot, adapter)
            self._remember(name, slot, source, key, adapter, digest)
            if pin:
                self.table.pinned.add(name)

    def swap(
        self,
        name: str,
        source: str | os.PathLike,
        *,
        type: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        root: str | os.PathLike | None = None,
    ) -> None:
        """Replaces `name`'s weights with those at `source` (any type); batches in flight finish on the old
        ones. `root` as for `load`."""
        with self._lock:
            self._check_not_training(name, "swap")
        key, adapter, digest = self._fetch(source, type, revision, subfolder, token, cache_dir, allow_pickle, root)
        with self._placing(key, adapter, digest):
            self._wait_for_training_steps()
            self._check_not_training(name, "swap")  # it may have been unloaded or evicted while the files were read
            pinned = name in self.table.pinned
            old = self.table.slot_of[name]
            # Another slot if one is free or a batch reads the old one (no batch can start while
            # we hold the lock); else the old slot in place.
            if self.table.free_slots() or self.table.in_flight.get(old):
                slot = self._free_slot(name, keep=name)
            else:
                slot = old
            try:
                self._write(slot, adapter)
            except BaseException:
                if slot == old:  # the old weights are partly overwritten: the name cannot stay
                    self.table.remove(name)
                    del self._records[name]
                raise
            self.composer.forget_input(name)
            self.table.remove(name)
            self._remember(name, slot, str(source), key, adapter, digest)
            if pinned:
                self.table.pinned.add(name)
            log.info("swapped adapter %r: slot %d -> %d", name, old, slot)

    def unload(self, name: str) -> None:
        """Removes `name` (pinned or not); its slot is reused once no batch in flight reads it. A
        composition registered as `name` is forgotten; materializations made from `name` are dropped."""
        with self._lock:
            if name in self.composer.named:
                del self.composer.named[name]
                return
            self._check_not_training(name, "unload")
            self.composer.forget_input(name, unloaded=True)
            self.table.remove(name)
            del self._records[name]

    def save(self, name: str, directory: str | os.PathLike) -> None:
        """Writes `name` in its type's format (PEFT's for the PEFT types); inside a `training` block, its
        current parameters (the slots themselves catch up only at the next forward)."""
        with self._lock:
            self._record(name)
            trainable = self._training.get(name)
            adapter = trainable.adapter(name) if trainable is not None else self._extract(name)
        self.types.get(adapter.type).write(adapter, Path(directory))

    # ---- compositions --------------------------------------------------------------------
    def compose(self, name: str, spec: Composition | Mapping) -> str:
        """Registers a composition of resident adapters under `name`, usable wherever an adapter's name
        is (`use`), e.g. compose("blend", {"adapters": [{"name": "a", "weight": 0.7}, {"name": "b",
        "weight": 0.3}], "method": "ties", "density": 0.5}). Checked now, and materialized now unless
        its method is "cat"; a later swap of an input makes the next use materialize it again."""
        composition = Composition.parse(spec, f"compose({name!r})")
        with self._lock:
            self._check_new_name(name)
            if name in composition.names:
                raise AdapterError(f"compose({name!r}) names itself among its adapters; give it another name")
            self.materialize(composition)
            self.composer.named[name] = composition
        return name

    def materialize(self, spec: Composition | Mapping | str, *, pin: bool = False) -> str | None:
        """The resident name of a composition's merged weights: made now unless resident or in the host
        cache (`pin` pins it), or None for "cat", which merges nothing. An AdapterError if it cannot
        run; NoFreeSlot if no slot can be freed for it."""
        with self._lock:
            composition = self._composition(spec)
            adapter_type, method = self.composer.plan(composition)
            if method == "cat":
                return None
            return self.composer.materialize(composition, adapter_type, method, pin)

    @property
    def compositions(self) -> dict[str, Composition]:
        """The compositions registered with `compose`, by name."""
        with self._lock:
            return dict(self.composer.named)

    def composition_key(self, spec: Composition | Mapping | str) -> str:
        """sha256 hex naming what a composition computes: its inputs' content digests and weights, its
        method and options (a server keys its prefix cache by it). An AdapterError if it cannot run."""
        with self._lock:
            composition = self._composition(spec)
            return self.composer.key(composition, self.composer.plan(composition)[1])

    def composition_method(self, spec: Composition | Mapping | str) -> str:
        """The method a composition runs with (its own, or its adapters' type's default); an
        AdapterError if it cannot run."""
        with self._lock:
            return self.composer.plan(self._composition(spec))[1]

    def _composition(self, spec: Composition | Mapping | str) -> Composition:
        if isinstance(spec, str):
            if spec not in self.composer.named:
                raise AdapterError(f"no composition named {spec!r}; compositions: {sorted(self.composer.named)}")
            return self.composer.named[spec]
        return Composition.parse(spec)

    # ---- routing -------------------------------------------------------------------------
    def routing_buffers(self, rows: int, columns: int = 1) -> RoutingBuffers:
        """Routes on fixed tensors, on the model's device, for batches of `rows` rows: pass them to
        `use(names, buffers=...)`, which rewrites them in place, so that a CUDA graph captured inside
        one such block replays inside another with that block's routing (docs/cuda-graphs.md).

        One route per adapter type that has slots or resident adapters and runs per token
        (`AdapterType.packed`: all but prompt tuning, which changes the sequence), with the features of
        its resident adapters, plus ALL_ROWS (modules_to_save heads). `columns` > 1: the types that
        compose with "cat" get (rows, columns) routes, for "cat" rows of up to that many adapters.
        Make them once the first adapter of each type (and of each feature, e.g. DoRA) is loaded:
        `use` refuses batches that the tensors made now could not route."""
        if rows < 1 or columns < 1:
            raise ValueError(f"routing_buffers needs rows >= 1 and columns >= 1, got {rows} and {columns}")
        with self._lock:
            layout = {}
            for type_name in sorted({t for t, _ in self._module_slots} | {r.type for r in self._records.values()}):
                adapter_type = self.types.get(type_name)
                if adapter_type.packed:
                    width = columns if "cat" in adapter_type.composition_methods() else 1
                    found = [r.features for r in self._records.values() if r.type == type_name]
                    layout[type_name] = (width, frozenset().union(*found))
            layout[ALL_ROWS] = (1, frozenset().union(*(f for _, f in layout.values())))
            hooked = {key: self._hooked[key] for key in layout}
            return RoutingBuffers(rows, layout, self._device(), self.routing, hooked)

    @contextlib.contextmanager
    def use(
        self,
        names: Row | Sequence[Row] | None,
        *,
        repeat: int = 1,
        lengths: Sequence[int] | None = None,
        buffers: RoutingBuffers | None = None,
    ) -> Iterator[None]:
        """Routes every forward of the model inside the block.

        `names`: one name (or None = base) for all rows of any batch, or one per row of the batch;
        the rows may use adapters of different types. A row may also be a composition of resident
        adapters: a `Composition`, its dict form ({"adapters": [{"name", "weight"}], "method", ...}),
        or the name `compose` registered it under. "cat" rows run on the fly; other methods use their
        materialization, made now (and cached) if it is not resident.
        `repeat`: rows per name, for generate() with num_beams x num_return_sequences > 1.
        `lengths`: a packed batch (the server's ragged steps): the forward gets one sequence
        (1, sum(lengths)) in which the next lengths[i] tokens are names[i]'s, each routed to its own
        adapter; for adapter types that run packed (`AdapterType.packed`: not prompt tuning).
        `buffers` (`routing_buffers`): write the routing into those fixed tensors, in place, and route
        with them, for CUDA graphs: one name per buffer row (len(names) * repeat == rows) or one for
        all. Refused with an AdapterError (leaving no slot acquired and the buffers as they were) with
        `lengths`, or for a batch they cannot route: a type or feature they were made without, a "cat"
        row wider than their columns, slots attached to more modules since they were made.
        One block runs at a time (blocks in other threads wait; blocks do not nest), and while
        it runs it routes this model's forwards from every thread. Loads, swaps and unloads from
        other threads go on meanwhile.
        """
        broadcast = names is None or isinstance(names, (str, Composition, Mapping))
        per_row = [names] if broadcast else list(names)
        if not per_row or repeat < 1:
            raise AdapterError(f"Backbone.use needs at least one name and repeat >= 1, got {names!r}, repeat={repeat}")
        if lengths is not None:
            lengths = [int(n) for n in lengths]
            if broadcast or len(lengths) != len(per_row) or repeat != 1 or min(lengths) < 0:
                raise AdapterError(
                    f"Backbone.use(names, lengths=...) needs a list of names and one token count >= 0 per "
                    f"name (and no repeat); got {len(per_row)} name(s), {len(lengths)} length(s), repeat={repeat}"
                )
        if buffers is not None:
            self._check_buffers(buffers, None if broadcast else len(per_row) * repeat, lengths)
        if self._use_owner == threading.get_ident():
            raise AdapterError("Backbone.use blocks do not nest: leave the current block first")
        with self._use_lock:
            self._use_owner = threading.get_ident()
            try:
                with self._lock:
                    if buffers is not None:  # under the lock: no load hooks more modules until _routed is done
                        self._check_hooks(buffers)
                    slots, types, features, used = self._routed(per_row)
                try:
                    if lengths is not None:
                        self._check_packed(per_row, types)
                    if buffers is None:
                        routes = routes_for(slots, types, features, broadcast, repeat, self._device(), lengths)
                    else:
                        routes = self._written(buffers, per_row, slots, types, features, broadcast, repeat)
                    self.routing.set(routes)
                    yield
                finally:
                    self.routing.clear()
                    with self._lock:
                        self.table.release(used)
            finally:
                self._use_owner = None

    # ---- internals -----------------------------------------------------------------------
    def _check_buffers(self, buffers: RoutingBuffers, rows: int | None, lengths: Sequence[int] | None) -> None:
        """Refuses `use(..., buffers=)` calls the buffers can never route, before anything is acquired;
        rows: the batch's rows (None: one name for all)."""
        if buffers.owner is not self.routing:
            raise AdapterError("these routing buffers were made by another Backbone; make them with this one's")
        if lengths is not None:
            raise AdapterError(
                "Backbone.use(lengths=...) routes a packed batch, whose token count changes every step, and "
                "routing buffers hold a fixed number of rows; route one name per row of a fixed-shape batch "
                "with buffers, or packed batches without buffers"
            )
        if rows is not None and rows != buffers.rows:
            raise AdapterError(
                f"these routing buffers route {buffers.rows} rows, but Backbone.use got {rows} (names x repeat); "
                f"give one name per row (None for padding rows), or make buffers with routing_buffers({rows})"
            )

    def _check_hooks(self, buffers: RoutingBuffers) -> None:
        """Under the lock: refuses buffers made before some type's slots or heads went onto more modules."""
        grown = sorted(
            "modules_to_save heads" if key == ALL_ROWS else f"{key} slots"
            for key, count in buffers.hooked.items()
            if self._hooked[key] != count
        )
        if grown:
            raise AdapterError(
                f"{' and '.join(grown)} went onto more modules since these routing buffers were made (an adapter "
                "adapting other modules was loaded), and a graph captured with them would skip those modules; "
                "make new buffers with Backbone.routing_buffers() and capture again"
            )

    def _written(
        self,
        buffers: RoutingBuffers,
        rows: list[Row],
        slots: list[Slots],
        types: list[str | None],
        features: list[frozenset[str]],
        broadcast: bool,
        repeat: int,
    ) -> dict[str, Route]:
        """The batch's routing written into `buffers` (their routes, every one set), or an AdapterError
        naming the row whose type they have no route for."""
        routes = routes_for(slots, types, features, broadcast, repeat, torch.device("cpu"))
        for row, type_name in zip(rows, types):
            if type_name is not None and type_name not in buffers.routes:
                if not self.types.get(type_name).packed:
                    raise AdapterError(
                        f"{row!r:.80} is a {type_name} adapter, which cannot run with routing buffers: it "
                        "changes the sequence itself, which no fixed-shape CUDA graph holds; route it with "
                        "Backbone.use(names) without buffers"
                    )
                raise AdapterError(
                    f"{row!r:.80} is a {type_name} adapter, and these routing buffers have no {type_name} route "
                    "(its type had no slots when they were made); make new buffers with "
                    "Backbone.routing_buffers() now that it is loaded, and capture again"
                )
        buffers.write(routes, broadcast)
        return buffers.routes

    def _device(self) -> torch.device:
        """Where the routing index is made (each module moves it to its own device if needed)."""
        return next(iter(self.model.parameters())).device

    def _record(self, name: str) -> _Record:
        if name not in self._records:
            raise AdapterError(f"no adapter named {name!r} is loaded; loaded: {sorted(self._records)}")
        return self._records[name]

    def _wait_for_training_steps(self) -> None:
        """Under the lock (which the wait lets go): until no other thread has a training step in flight.
        A thread's own step does not hold back its own loads."""
        me = threading.get_ident()
        self._steps_ended.wait_for(lambda: not any(n for owner, n in self._steps.items() if owner != me))

    def _check_not_training(self, name: str, what: str) -> None:
        self._record(name)
        if name in self._training:
            raise AdapterError(f"cannot {what} {name!r} while a training() block trains it; leave the block first")

    def _check_packed(self, names: list[Row], types: list[str | None]) -> None:
        for name, type_name in zip(names, types):
            if type_name is not None and not self.types.get(type_name).packed:
                raise AdapterError(
                    f"{name!r:.80} is a {type_name} adapter, which cannot run in a packed batch "
                    "(Backbone.use(lengths=...)); route it per row instead"
                )

    def _routed(self, rows: list[Row]) -> tuple[list[Slots], list[str | None], list[frozenset[str]], list[int]]:
        """Under the lock: each row's slots, type and features, and the slots acquired for the batch.
        Each row's slots are acquired as soon as they are known, so that materializing a later row's
        composition (which may evict) cannot take them."""
        slots, types, features, used = [], [], [], []
        try:
            for row in rows:
                found = self._route_row(row)
                taken = [found[0]] if isinstance(found[0], int) else [s for s, _ in found[0]]
                taken = [s for s in taken if s >= 0]
                self.table.acquire(taken)
                used += taken
                for out, value in zip((slots, types, features), found):
                    out.append(value)
        except BaseException:
            self.table.release(used)
            raise
        return slots, types, features, used

    def _route_row(self, row: Row) -> tuple[Slots, str | None, frozenset[str]]:
        if row is None:
            return -1, None, frozenset()
        if isinstance(row, str) and row not in self.composer.named:
            record = self._record(row)
            self.table.touch(row)
            return self.table.slot_of[row], record.type, record.features
        return self.composer.resolve(self._composition(row))

    def _check_new_name(self, name: str, materialized: bool = False) -> None:
        if name.startswith(MATERIALIZED) and not materialized:
            raise AdapterError(f"names starting with {MATERIALIZED!r} are the compositions' own; choose another name")
        if name in self.composer.named:
            raise AdapterError(f"{name!r} names a composition (Backbone.compose); unload it first or use another name")
        if name in self._records:
            raise AdapterError(
                f"an adapter named {name!r} is already loaded (from {self._records[name].source}); "
                f"use swap({name!r}, ...) to replace its weights, or load under another name"
            )

    def _fetch(
        self, source, type_name, revision, subfolder, token, cache_dir, allow_pickle, root
    ) -> tuple[tuple, Adapter, str]:
        """(key of the files, adapter, its digest): from the host cache when these very files were
        evicted, else read, checked and hashed."""
        directory = Path(
            resolve(source, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir, root=root)
        )
        key = source_key(directory)
        cached = self.host_cache.pop(key)
        if cached is not None and type_name not in (None, cached[0].type):
            self.host_cache.put(key, *cached)  # the same files, read as another type
            cached = None
        if cached is not None:
            adapter, digest = cached
            return key, adapter, digest or adapter_digest(adapter)
        if type_name is None:
            _read_config_first(directory)
        adapter_type = self.types.get(type_name) if type_name else self.types.recognize(directory)
        adapter = adapter_type.place(adapter_type.read(directory, allow_pickle=allow_pickle), self.model)
        self._check(adapter)
        return key, adapter, adapter_digest(adapter)

    @contextlib.contextmanager
    def _placing(self, key: tuple, adapter: Adapter, digest: str) -> Iterator[None]:
        """The locked section that puts a checked adapter into a slot; if it is refused (no slot,
        name taken meanwhile) or fails (out of memory), the adapter goes back to the host cache
        instead of being lost."""
        with self._lock:
            try:
                yield
            except BaseException:
                self.host_cache.put(key, adapter, digest)
                raise

    def _check(self, adapter: Adapter) -> None:
        """The config fits the type's schema, every module exists, the rank fits the slots, the type
        accepts the tensors; raises before anything is written."""
        adapter_type = self.types.get(adapter.type)
        check_config(adapter.config, adapter_type.config_schema, adapter.source or "the adapter's config")
        for path in adapter.modules:
            if path not in self._modules:
                raise AdapterError(
                    f"{adapter.source}: the adapter adapts module {path!r}, which does not exist in "
                    f"{type(self.model).__name__}; modules include {sorted(self._modules)[1:7]}"
                )
        rank = adapter_type.rank(adapter)
        if rank > self.max_rank:
            raise AdapterError(
                f"{adapter.source}: the {adapter.type} adapter has rank {rank} > max_rank "
                f"{self.max_rank}; create the Backbone with max_rank >= {rank}"
            )
        adapter_type.check(adapter, self.model)
        for path, state in adapter.modules_to_save.items():
            self._check_head(adapter, path, state)

    def _check_head(self, adapter: Adapter, path: str, state: dict[str, torch.Tensor]) -> None:
        module = self._modules.get(path)
        if not isinstance(module, nn.Linear):
            raise AdapterError(
                f"{adapter.source}: modules_to_save names {path!r}, which is "
                f"{'missing from the model' if module is None else type(module).__name__}; "
                "only nn.Linear modules can be saved per adapter"
            )
        expected = {key: tuple(p.shape) for key, p in module.named_parameters(recurse=False)}
        got = {key: tuple(t.shape) for key, t in state.items()}
        if got != expected:
            raise AdapterError(
                f"{adapter.source}: the modules_to_save copy of {path!r} has tensors {got}, "
                f"expected {expected} (the module's own parameters)"
            )
        if module.weight.numel() > HeadSlots.MAX_PARAMETERS:
            raise AdapterError(
                f"{adapter.source}: modules_to_save names {path!r} with {module.weight.numel()} "
                f"weights; per-adapter copies are for small heads (<= {HeadSlots.MAX_PARAMETERS})"
            )

    def _free_slot(self, name: str, keep: str | None = None) -> int:
        free = self.table.free_slots()
        if free:
            return free[0]
        victim = self.table.eviction_candidate(exclude=keep)
        if victim is None:
            raise NoFreeSlot(
                f"cannot load {name!r}: all {self.max_adapters} slots are pinned or in use by "
                "batches in flight; unpin or unload an adapter, or create the Backbone with a "
                "larger max_adapters"
            )
        record = self._records[victim]
        self.host_cache.put(record.source_key, self._extract(victim).to("cpu"), record.digest)
        slot = self.table.remove(victim)
        del self._records[victim]
        self.evictions += 1
        log.info("evicted adapter %r (least recently used) from slot %d to make room for %r", victim, slot, name)
        return slot

    def _allocate(self, adapter_type: AdapterType, path: str) -> ModuleSlots:
        """The type's slots on module `path`, allocated (all empty) on first use."""
        key = (adapter_type.name, path)
        if key not in self._module_slots:
            module = self._modules[path]
            slots = adapter_type.allocate(module, path, self.max_adapters, self.max_rank)
            attach(module, slots, self.routing, adapter_type.name, f"adapterhub_{adapter_type.name}")
            self._module_slots[key] = slots
            self._hooked[adapter_type.name] += 1
        return self._module_slots[key]

    def _write(self, slot: int, adapter: Adapter) -> None:
        adapter_type = self.types.get(adapter.type)
        for path in adapter.modules:
            self._allocate(adapter_type, path)
        for (type_name, path), slots in self._module_slots.items():
            if type_name == adapter.type:
                slots.write(slot, adapter.modules.get(path))
        for path in adapter.modules_to_save:
            self._head(path)
        for path, head in self._heads.items():
            head.write(slot, adapter.modules_to_save.get(path))

    def _head(self, path: str) -> HeadSlots:
        if path not in self._heads:
            module = self.model.get_submodule(path)
            head = HeadSlots(module, self.max_adapters)
            attach(module, head, self.routing, ALL_ROWS, "adapterhub_head")
            self._heads[path] = head
            self._hooked[ALL_ROWS] += 1
        return self._heads[path]

    def _remember(self, name: str, slot: int, source: str, key: tuple, adapter: Adapter, digest: str) -> None:
        self.table.assign(name, slot)
        adapter_type = self.types.get(adapter.type)
        self._records[name] = _Record(
            type=adapter.type,
            source=source,
            source_key=key,
            config=dict(adapter.config),
            rank=adapter_type.rank(adapter),
            modules=tuple(adapter.modules),
            nbytes=adapter.nbytes(),
            heads=tuple(adapter.modules_to_save),
            features=adapter_type.features(adapter),
            digest=digest,
        )

    def _extract(self, name: str) -> Adapter:
        """The resident adapter copied out of its slot, as read from disk."""
        record, slot = self._records[name], self.table.slot_of[name]
        modules = {path: self._module_slots[(record.type, path)].read(slot) for path in record.modules}
        heads = {path: self._heads[path].read(slot) for path in record.heads}
        return Adapter(
            type=record.type, config=dict(record.config), modules=modules, modules_to_save=heads, source=record.source
        )


def _read_config_first(directory: Path) -> None:
    """Parses the directory's config file, if it has one, before the registry recognizes the directory:
    the registry reads it leniently (a file it cannot read or parse counts as none, "no
    adapter_config.json"; one nested too deep raises RecursionError; a peft_type that is a list or
    an object, TypeError), so its real fault (unreadable, not JSON, too deep, not an object, a
    peft_type that is not a string) is named here, with the file."""
    file = directory / CONFIG_FILE
    if not os.path.lexists(file):
        return
    config = read_json_object(file, resave="save the adapter again")
    tag = config.get("peft_type")
    if tag is not None and not isinstance(tag, str):
        raise AdapterError(
            f'{file}: peft_type must be a string naming the adapter\'s type (e.g. "LORA"), got {tag!r:.80}; '
            "fix the config or save the adapter again"
        )
