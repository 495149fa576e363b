"""Backbone: one frozen model, many resident adapters in preallocated slots, routed per row.

    bb = Backbone(model, max_adapters=64, max_rank=64)
    bb.load("org/name", name="support"); bb.load("./legal-lora", name="legal")
    with bb.use(["support", "legal", None]):   # one adapter per row, None = base
        model(ids)

Loading reads and checks the whole adapter before touching any slot, then copies it into
a free slot of every target module (evicting the least recently used unpinned adapter
when all are taken). Nothing in the model is rebuilt or reshaped, so a compiled model
never recompiles. A swap writes the new weights into another slot and then remaps the
name, so a batch in flight finishes on the weights it started with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import AdapterError
from .formats import LoraAdapter, LoraModule, read_peft_lora, write_peft_lora
from .host_cache import HostCache, source_key
from .hub import resolve
from .layers import HeadSlots, LoraSlots, Routing, is_conv1d
from .slots import SlotTable

log = logging.getLogger("adapterhub")


@dataclass(frozen=True)
class AdapterInfo:
    """What `Backbone.info` tells about a resident adapter."""

    name: str
    source: str
    slot: int
    rank: int
    modules: int
    use_dora: bool
    nbytes: int
    pinned: bool
    config: dict


@dataclass
class _Record:
    source: str
    source_key: tuple
    config: dict
    rank: int
    modules: int
    use_dora: bool
    nbytes: int
    heads: tuple[str, ...]


def find_targets(model: nn.Module, target_modules: Sequence[str] | str | None) -> dict[str, nn.Module]:
    """Linear layers to adapt: by default every nn.Linear / Conv1D inside the model's repeated
    blocks (any nn.ModuleList); else names (exact or dotted suffix) or one regex (full match)."""
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    if target_modules is None:
        blocks = [name + "." for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        chosen = {n: m for n, m in linear.items() if any(n.startswith(b) for b in blocks)}
    elif isinstance(target_modules, str):
        chosen = {n: m for n, m in linear.items() if re.fullmatch(target_modules, n)}
    else:
        wanted = list(target_modules)
        chosen = {n: m for n, m in linear.items() if any(n == t or n.endswith("." + t) for t in wanted)}
    if not chosen:
        raise AdapterError(f"no linear layer of {type(model).__name__} matches target_modules={target_modules!r}; "
                           f"linear layers include {sorted(linear)[:8]}")
    return chosen


class Backbone:
    """A frozen model serving many adapters at once. See the module docstring."""

    def __init__(self, model: nn.Module, *, max_adapters: int = 16, max_rank: int = 16,
                 target_modules: Sequence[str] | str | None = None, host_cache_bytes: int = 1 << 30):
        if max_adapters < 1 or max_rank < 1:
            raise ValueError(f"max_adapters and max_rank must be >= 1, got {max_adapters} and {max_rank}")
        self.model = model.requires_grad_(False)
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.routing = Routing()
        self.table = SlotTable(max_adapters)
        self.host_cache = HostCache(host_cache_bytes)
        self._records: dict[str, _Record] = {}
        self._lock = threading.RLock()  # slot table and records
        self._use_lock = threading.Lock()  # one routed batch at a time
        self._use_owner: int | None = None  # the thread inside use()
        self._modules = dict(model.named_modules())  # before our slot modules are attached
        self._targets = find_targets(model, target_modules)
        self._lora: dict[str, LoraSlots] = {}
        for path, module in self._targets.items():
            slots = LoraSlots(module, self.routing, max_adapters, max_rank)
            module.add_module("adapterhub_lora", slots)
            module.register_forward_hook(slots.hook)
            self._lora[path] = slots
        self._heads: dict[str, HeadSlots] = {}

    # ---- what is resident --------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self.table.slot_of)

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            record = self._record(name)
            return AdapterInfo(name=name, source=record.source, slot=self.table.slot_of[name],
                               rank=record.rank, modules=record.modules, use_dora=record.use_dora,
                               nbytes=record.nbytes, pinned=name in self.table.pinned, config=dict(record.config))

    def pin(self, name: str) -> None:
        """Keeps `name` resident: LRU eviction passes it over until `unpin`."""
        with self._lock:
            self._record(name)
            self.table.pinned.add(name)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._record(name)
            self.table.pinned.discard(name)

    # ---- loading -------------------------------------------------------------------------
    def load(self, source: str | os.PathLike, name: str | None = None, *, revision: str | None = None,
             subfolder: str | None = None, token: str | bool | None = None,
             cache_dir: str | os.PathLike | None = None, allow_pickle: bool = False) -> str:
        """Loads a PEFT LoRA adapter (local directory or Hub repo id) into a free slot; returns its name."""
        name = name or os.path.basename(os.path.normpath(str(subfolder or source)))
        with self._lock:
            self._check_new_name(name)
        key, adapter = self._fetch(source, revision, subfolder, token, cache_dir, allow_pickle)
        with self._placing(key, adapter):
            self._check_new_name(name)
            slot = self._free_slot(name)
            self._write(slot, adapter)
            self._remember(name, slot, str(source), key, adapter)
        return name

    def swap(self, name: str, source: str | os.PathLike, *, revision: str | None = None,
             subfolder: str | None = None, token: str | bool | None = None,
             cache_dir: str | os.PathLike | None = None, allow_pickle: bool = False) -> None:
        """Replaces `name`'s weights with those at `source`; batches in flight finish on the old ones."""
        with self._lock:
            self._record(name)
        key, adapter = self._fetch(source, revision, subfolder, token, cache_dir, allow_pickle)
        with self._placing(key, adapter):
            self._record(name)  # it may have been unloaded or evicted while the files were read
            pinned = name in self.table.pinned
            old = self.table.slot_of[name]
            # Another slot if one is free or a batch reads the old one (no batch can start while
            # we hold the lock); else the old slot in place.
            if self.table.free_slots() or self.table.in_flight.get(old):
                slot = self._free_slot(name, keep=name)
            else:
                slot = old
            self.table.remove(name)
            self._write(slot, adapter)
            self._remember(name, slot, str(source), key, adapter)
            if pinned:
                self.table.pinned.add(name)
            log.info("swapped adapter %r: slot %d -> %d", name, old, slot)

    def unload(self, name: str) -> None:
        """Removes `name` (pinned or not); its slot is reused once no batch in flight reads it."""
        with self._lock:
            self._record(name)
            self.table.remove(name)
            del self._records[name]

    def save(self, name: str, directory: str | os.PathLike) -> None:
        """Writes `name` in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        with self._lock:
            write_peft_lora(self._extract(name), directory)

    # ---- routing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, names: str | None | Sequence[str | None], *, repeat: int = 1) -> Iterator[None]:
        """Routes every forward of the model inside the block.

        `names`: one name (or None = base) for all rows of any batch, or one per row of the batch.
        `repeat`: rows per name, for generate() with num_beams x num_return_sequences > 1.
        One block runs at a time (blocks in other threads wait; blocks do not nest), and while
        it runs it routes this model's forwards from every thread. Loads, swaps and unloads from
        other threads go on meanwhile.
        """
        broadcast = names is None or isinstance(names, str)
        per_row = [names] if broadcast else list(names)
        if not per_row or repeat < 1:
            raise AdapterError(f"Backbone.use needs at least one name and repeat >= 1, got {names!r}, repeat={repeat}")
        if self._use_owner == threading.get_ident():
            raise AdapterError("Backbone.use blocks do not nest: leave the current block first")
        with self._use_lock:
            self._use_owner = threading.get_ident()
            try:
                with self._lock:
                    slots = [self._slot_for_use(n) for n in per_row]
                    used = sorted({s for s in slots if s >= 0})
                    self.table.acquire(used)
                    dora = any(self._records[n].use_dora for n in per_row if n is not None)
                try:
                    device = next(iter(self._lora.values())).A.device
                    index = torch.tensor(slots, dtype=torch.long, device=device)
                    self.routing.set(index.repeat_interleave(repeat) if repeat > 1 else index,
                                     broadcast=broadcast, dora=dora)
                    yield
                finally:
                    self.routing.set(None)
                    with self._lock:
                        self.table.release(used)
            finally:
                self._use_owner = None

    # ---- internals -----------------------------------------------------------------------
    def _record(self, name: str) -> _Record:
        if name not in self._records:
            raise AdapterError(f"no adapter named {name!r} is loaded; loaded: {sorted(self._records)}")
        return self._records[name]

    def _slot_for_use(self, name: str | None) -> int:
        if name is None:
            return -1
        self._record(name)
        self.table.touch(name)
        return self.table.slot_of[name]

    def _check_new_name(self, name: str) -> None:
        if name in self._records:
            raise AdapterError(f"an adapter named {name!r} is already loaded (from {self._records[name].source}); "
                               f"use swap({name!r}, ...) to replace its weights, or load under another name")

    def _fetch(self, source, revision, subfolder, token, cache_dir, allow_pickle: bool) -> tuple[tuple, LoraAdapter]:
        """(key of the files, adapter): from the host cache when these very files were evicted, else read and checked."""
        directory = resolve(source, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir)
        key = source_key(directory)
        adapter = self.host_cache.take(key)
        if adapter is None:
            adapter = read_peft_lora(directory, allow_pickle=allow_pickle)
            self._check(adapter)
        return key, adapter

    @contextlib.contextmanager
    def _placing(self, key: tuple, adapter: LoraAdapter) -> Iterator[None]:
        """The locked section that puts a checked adapter into a slot; if it is refused (no slot,
        name taken meanwhile), the adapter goes back to the host cache instead of being lost."""
        with self._lock:
            try:
                yield
            except AdapterError:
                self.host_cache.put(key, adapter)
                raise

    def _check(self, adapter: LoraAdapter) -> None:
        """Every tensor fits a target module and the slots; raises before anything is written."""
        all_modules = self._modules
        for path, module in adapter.modules.items():
            if path not in self._lora:
                why = ("does not exist in the model" if path not in all_modules
                       else "is not a target module of this Backbone (pass target_modules including it)")
                raise AdapterError(f"{adapter.source}: the adapter adapts module {path!r}, which {why}; "
                                   f"target modules include {sorted(self._lora)[:6]}")
            slots = self._lora[path]
            r = module.A.size(0)
            if r > self.max_rank:
                raise AdapterError(f"{adapter.source}: module {path!r} has rank {r} > max_rank {self.max_rank}; "
                                   f"create the Backbone with max_rank >= {adapter.rank}")
            expected = {"lora_A": (r, slots.in_features), "lora_B": (slots.out_features, r)}
            for tensor_name, tensor in (("lora_A", module.A), ("lora_B", module.B)):
                if tuple(tensor.shape) != expected[tensor_name]:
                    raise AdapterError(f"{adapter.source}: tensor {path}.{tensor_name} has shape "
                                       f"{tuple(tensor.shape)}, expected {expected[tensor_name]} for this backbone; "
                                       "was the adapter trained on another base model?")
            if module.magnitude is not None and tuple(module.magnitude.shape) != (slots.out_features,):
                raise AdapterError(f"{adapter.source}: tensor {path}.lora_magnitude_vector has shape "
                                   f"{tuple(module.magnitude.shape)}, expected ({slots.out_features},)")
        for path, state in adapter.modules_to_save.items():
            module = all_modules.get(path)
            if not isinstance(module, nn.Linear):
                raise AdapterError(f"{adapter.source}: modules_to_save names {path!r}, which is "
                                   f"{'missing from the model' if module is None else type(module).__name__}; "
                                   "only nn.Linear modules can be saved per adapter")
            expected = {key: tuple(p.shape) for key, p in module.named_parameters(recurse=False)}
            got = {key: tuple(t.shape) for key, t in state.items()}
            if got != expected:
                raise AdapterError(f"{adapter.source}: the modules_to_save copy of {path!r} has tensors {got}, "
                                   f"expected {expected} (the module's own parameters)")
            if module.weight.numel() > HeadSlots.MAX_PARAMETERS:
                raise AdapterError(f"{adapter.source}: modules_to_save names {path!r} with {module.weight.numel()} "
                                   f"weights; per-adapter copies are for small heads (<= {HeadSlots.MAX_PARAMETERS})")

    def _free_slot(self, name: str, keep: str | None = None) -> int:
        free = self.table.free_slots()
        if free:
            return free[0]
        victim = self.table.eviction_candidate(exclude=keep)
        if victim is None:
            raise AdapterError(f"cannot load {name!r}: all {self.max_adapters} slots are pinned or in use by "
                               "batches in flight; unpin or unload an adapter, or create the Backbone with a "
                               "larger max_adapters")
        self.host_cache.put(self._records[victim].source_key, self._extract(victim))
        slot = self.table.remove(victim)
        del self._records[victim]
        log.info("evicted adapter %r (least recently used) from slot %d to make room for %r", victim, slot, name)
        return slot

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        for path, slots in self._lora.items():
            module = adapter.modules.get(path)
            if module is None:
                slots.write(slot, None, None, 0.0, None, self._targets[path])
            else:
                slots.write(slot, module.A, module.B, module.scale, module.magnitude, self._targets[path])
        for path in adapter.modules_to_save:
            self._head(path)
        for path, head in self._heads.items():
            state = adapter.modules_to_save.get(path)
            head.present[slot] = state is not None
            if state is not None:
                head.weight[slot].copy_(state["weight"])
                if head.has_bias:
                    head.bias[slot].copy_(state["bias"])

    def _head(self, path: str) -> HeadSlots:
        if path not in self._heads:
            module = self.model.get_submodule(path)
            head = HeadSlots(module, self.routing, self.max_adapters)
            module.add_module("adapterhub_head", head)
            module.register_forward_hook(head.hook)
            self._heads[path] = head
        return self._heads[path]

    def _remember(self, name: str, slot: int, source: str, key: tuple, adapter: LoraAdapter) -> None:
        self.table.assign(name, slot)
        self._records[name] = _Record(source=source, source_key=key, config=dict(adapter.config), rank=adapter.rank,
                                      modules=len(adapter.modules), use_dora=adapter.use_dora,
                                      nbytes=adapter.nbytes(), heads=tuple(adapter.modules_to_save))

    def _extract(self, name: str) -> LoraAdapter:
        """The resident adapter copied out of its slot, as read from disk."""
        record, slot = self._records[name], self.table.slot_of[name]
        modules = {}
        for path, slots in self._lora.items():
            found = slots.read(slot, record.use_dora)
            if found is not None:
                A, B, scale, magnitude = found
                modules[path] = LoraModule(A=A, B=B, scale=scale, magnitude=magnitude)
        heads = {}
        for path in record.heads:
            head = self._heads[path]
            heads[path] = {"weight": head.weight[slot].clone()}
            if head.has_bias:
                heads[path]["bias"] = head.bias[slot].clone()
        return LoraAdapter(config=dict(record.config), modules=modules, modules_to_save=heads,
                           source=record.source, use_dora=record.use_dora,
                           fan_in_fan_out=bool(record.config.get("fan_in_fan_out", False)))
