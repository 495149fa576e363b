"""The adapter-type contract: what a plugin declares through the `adapter_types` hook.

An `AdapterType` reads and writes its on-disk format (into an `adapterhub.Adapter`), checks an
adapter against a backbone, allocates per-module slot tensors (`ModuleSlots`) and creates fresh
trainable weights. The Backbone does the rest (slot table, LRU, host cache, routing,
modules_to_save heads), the same way for every type. See docs/writing-a-plugin.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..formats.adapter import Adapter
from ..ops.reference import columns


class Route:
    """The rows of the batch in flight that use one adapter type: their slot, -1 for every other row.

    A packed route (`Backbone.use(names, lengths=...)`) routes a ragged batch flattened into one
    sequence, x (1, T, features): its index holds one slot per token, so `rows` is per position.

    A live route (`Backbone.routing_buffers`) keeps the same index and weight tensors for good; each
    `Backbone.use(names, buffers=...)` block rewrites them in place. Nothing derived from their values
    is cached then: every forward, and every op a CUDA graph recorded, reads the current block's routing.
    """

    def __init__(
        self,
        index: torch.Tensor,
        features: frozenset[str],
        broadcast: bool,
        packed: bool = False,
        weight: torch.Tensor | None = None,
        live: bool = False,
    ):
        # (n,) int64: the slot of each row (packed: of each token) of this type, -1 elsewhere; (n, K)
        # when a row is a "cat" composition of K adapters (-1 pads shorter rows), with `weight`
        self.index = index
        self.weight = weight  # None, or (n, K) fp32: each (row, slot) pair's weight, 1 for plain rows
        self.features = features  # union of AdapterType.features over the batch's adapters of this type
        self.broadcast = broadcast  # index holds one slot for every row of any batch
        self.packed = packed
        self.live = live  # index and weight are rewritten in place between forwards: cache nothing
        self._cache: dict[tuple, torch.Tensor] = {}

    def rows(self, n0: int, rows: int, device: torch.device) -> torch.Tensor:
        """(rows,) slot per row for x (n0, ..., features) flattened to (rows, features), on x's device
        (a model may span devices): every position of batch row i gets row i's slot (packed: every
        position its token's slot). (rows, K) when the batch holds "cat" compositions (`weights`)."""
        return self._per_row(self.index, n0, rows, device)

    def pairs(self, n0: int, rows: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The routing as K columns of (slot (rows,), weight (rows,) fp32 or None = 1), contiguous, for
        ops that take one slot per row: a row's effect is the weighted sum over the columns."""
        if self.live or torch.compiler.is_compiling():  # live: would go stale; traced: a lookup breaks the graph
            return self._pairs(n0, rows, device)
        key = ("pairs", n0, rows, device)
        if key not in self._cache:
            self._cache[key] = self._pairs(n0, rows, device)
        return self._cache[key]

    def _pairs(self, n0: int, rows: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return list(columns(self.rows(n0, rows, device), self.weights(n0, rows, device)))

    def weights(self, n0: int, rows: int, device: torch.device) -> torch.Tensor | None:
        """(rows, K) fp32 weight of each row's (slot, weight) pairs, as `rows` lays out the slots; None
        when no row of the batch is a "cat" composition (index (rows,), weight 1)."""
        return None if self.weight is None else self._per_row(self.weight, n0, rows, device)

    def _per_row(self, table: torch.Tensor, n0: int, rows: int, device: torch.device) -> torch.Tensor:
        if self.live or torch.compiler.is_compiling():  # live: a cached copy would go stale
            return self._expand(table, n0, rows).to(device)
        key = (table is not self.index, n0, rows, device)
        if key not in self._cache:
            self._cache[key] = self._expand(table, n0, rows).to(device)
        return self._cache[key]

    def _expand(self, index: torch.Tensor, n0: int, rows: int) -> torch.Tensor:
        if self.packed:
            if index.size(0) != rows or n0 != 1:
                raise ValueError(
                    f"Backbone.use(lengths=...) routes a packed batch of {index.size(0)} tokens, but this "
                    f"forward holds {n0} row(s) of {rows // max(n0, 1)} positions; pass the tokens as one "
                    "sequence (1, sum(lengths))"
                )
            return index
        if self.broadcast:
            index = index.expand(n0, *index.shape[1:]).contiguous()
        elif index.size(0) != n0:
            raise ValueError(
                f"the batch has {n0} rows but Backbone.use routes {index.size(0)}; give one name "
                "per row (with repeat=k when generate() expands each row k times: num_beams x "
                "num_return_sequences), or a single name for all rows"
            )
        if rows == n0:
            return index
        # = repeat_interleave(rows // n0, dim=0), as a view and one copy: never a host sync (CUDA graphs)
        per = rows // n0
        return index.unsqueeze(1).expand(n0, per, *index.shape[1:]).reshape(rows, *index.shape[1:]).contiguous()


class ModuleSlots(nn.Module):
    """One adapter type's preallocated slots on one module of the backbone.

    Tensors are non-persistent buffers of shape (slots, ...), written in place, so loading never
    changes a shape and `model.state_dict()` stays the user's. Override `before` to change the
    module's inputs, `after` to change its output; each is called only for batches that have
    rows of this type, with their `Route`.
    """

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        """Copies one adapter's tensors for this module into `slot`; None: it does not adapt this module."""
        raise NotImplementedError

    def read(self, slot: int) -> dict[str, torch.Tensor] | None:
        """The tensors `write` was given for `slot`, or None: copies of slot data (the slot may be
        rewritten later); frozen tensors shared by many modules may be returned as they are."""
        raise NotImplementedError

    def before(self, module: nn.Module, args: tuple, kwargs: dict, route: Route) -> tuple[tuple, dict] | None:
        """New (args, kwargs) for the module's forward, or None to leave them."""
        return None

    def virtual_tokens(self, slot: int) -> torch.Tensor | None:
        """The (n, dim) input embeddings the adapter in `slot` puts before every row's tokens (prompt
        tuning), or None. A type whose `packed` is False must give them: the server places them in a
        packed sequence itself, positions 0..n-1, and routes the row as the base model."""
        return None

    def after(self, module: nn.Module, args: tuple, output: Any, route: Route) -> Any:
        """The module's new output (may be `output` changed in place), or None to leave it."""
        return None


class AdapterType:
    """An adapter type. Subclass it, set the class attributes, implement the methods.

    `name` is what users pass as `type=` and what `Adapter.type` holds; `aliases` are the
    PEFT `peft_type` values (or other format tags) whose directories this type reads;
    `config_schema` is a JSON Schema of the config: the Backbone checks every adapter's config against it
    after `read` (and `Backbone.add`), and the config given to `Backbone.create` before `init`.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    # True: its slots work per token of a packed batch (`Route.packed`: `route.rows` per position), as
    # the server's steps need. Opt-in, so a type written before packed batches is refused by name there
    # rather than failing whole batches. A type that changes the sequence itself (prompt tuning) stays
    # False and gives `ModuleSlots.virtual_tokens`, which the server places itself.
    packed: ClassVar[bool] = False
    config_schema: ClassVar[dict] = {"type": "object"}
    description: ClassVar[str] = ""

    def read(self, directory: Path, *, allow_pickle: bool = False) -> Adapter:
        """Reads and checks the adapter in `directory`; any problem is an AdapterError naming file and key."""
        raise NotImplementedError

    def write(self, adapter: Adapter, directory: Path) -> None:
        """Writes `adapter` in this type's format, loadable by the library that defined the format."""
        raise NotImplementedError

    def place(self, adapter: Adapter, model: nn.Module) -> Adapter:
        """`adapter` fitted to `model` before it is checked: e.g. module paths saved from a bare
        BertModel moved onto BertForSequenceClassification (`bert.` prefix). Default: unchanged."""
        return adapter

    def features(self, adapter: Adapter) -> frozenset[str]:
        """Optional computations this adapter needs (LoRA: {"dora"}), passed to the slots as
        `Route.features` so that batches without them skip them. A compiled model compiles once per
        set of features, so keep them few and coarse; per-slot data belongs in tensors."""
        return frozenset()

    def rank(self, adapter: Adapter) -> int:
        """The slot width `adapter` needs (LoRA r, bottleneck width, virtual tokens); <= Backbone max_rank."""
        raise NotImplementedError

    def check(self, adapter: Adapter, model: nn.Module) -> None:
        """Raises AdapterError if an adapted module is of the wrong kind or a tensor has the wrong shape.
        The Backbone has already checked that every path names a module and that rank <= max_rank.
        It may complete the adapter from the model (VeRA rebuilds projections that PEFT did not save)."""
        raise NotImplementedError

    def allocate(self, module: nn.Module, path: str, slots: int, max_rank: int) -> ModuleSlots:
        """Empty slots for `module` (at `path` in the model): every slot adapts nothing until written."""
        raise NotImplementedError

    def trainable(self, adapter: Adapter) -> list[tuple[str, str]]:
        """(module path, tensor name) of the tensors a trainer updates; an AdapterError if this adapter
        cannot be trained. Default: every floating-point tensor with a dimension (0-d tensors hold
        scalings derived from the config). `write` must copy them with differentiable ops (`copy_`,
        products), so that gradients reach them when the Backbone trains."""
        return [
            (path, key)
            for path, parts in adapter.modules.items()
            for key, t in parts.items()
            if t.is_floating_point() and t.dim() > 0
        ]

    def composition_methods(self) -> tuple[str, ...]:
        """The methods this type combines its adapters with, per request or under a name
        (`Backbone.use` / `Backbone.compose`); the first is the default, () means it cannot compose.
        Names follow PEFT's `add_weighted_adapter` (linear, svd, ties, dare_linear, ...). "cat" is
        special: it is never materialized; rows are routed to each input's slot with a weight
        (`Route.weights`), so it is only for slots that add every (slot, weight) pair's effect, as
        `LowRankSlots` does. Every other method is materialized once by `compose` and cached."""
        return ()

    def compose(self, adapters: list[Adapter], weights: list[float], method: str, options: dict) -> Adapter:
        """One adapter of this type combining `adapters` (all of this type, checked against the model)
        with `weights` by `method` (one of `composition_methods`, not "cat"). `options`: density,
        majority_sign_method, svd_rank, svd_clamp, svd_full_matrices, seed (for random methods),
        normalize_weights, as the request gave them. An AdapterError says what cannot be combined."""
        raise NotImplementedError

    def cat_scale(self, configs: list[dict]) -> float:
        """The factor every weight of a "cat" composition of adapters with `configs` is multiplied by
        (PEFT's merged adapter scale: 1 for LoRA, sqrt(sum of ranks) with rsLoRA)."""
        return 1.0

    def init(self, model: nn.Module, config: dict) -> Adapter:
        """A fresh adapter for `model` from `config` (validated against config_schema), initialised
        as the format's library does it, ready to train."""
        raise NotImplementedError
