"""The batch in flight, shared by every adapted module, and the hooks that hand it to their slots.

`Backbone.use` sets one `Route` per adapter type present in the batch (each row's slot where the
row's adapter is of that type, -1 elsewhere) and one over all rows (`ALL_ROWS`, for the
modules_to_save heads). The slot tensors of a type on a module (its `ModuleSlots`) are called
through forward hooks only when their route is set, so a batch of one type costs nothing in the
others' modules.

`RoutingBuffers` are routes that stay: fixed device tensors that `Backbone.use(names, buffers=...)`
rewrites in place, so that a CUDA graph captured in one block replays another block's routing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..plugins.contract import ModuleSlots, Route
from .composer import Slots

ALL_ROWS = "*"  # the route over every row, whatever its adapter's type


class Routing:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}  # adapter type (or ALL_ROWS) -> its rows; empty: no adapter in use

    def set(self, routes: dict[str, Route]) -> None:
        self.routes = routes

    def clear(self) -> None:
        self.routes = {}


class RoutingBuffers:
    """Routes on fixed device tensors for batches of `rows` rows, made by `Backbone.routing_buffers`.

    Each `Backbone.use(names, buffers=...)` block writes its batch's routing into these very tensors
    (in place: their storage never changes) and routes with these very `Route`s, every one of them
    set in every block (-1 in the rows of other types), so a CUDA graph captured inside one block
    holds every type's hooks and, replayed inside another block, runs that block's routing.
    """

    def __init__(
        self,
        rows: int,
        layout: dict[str, tuple[int, frozenset[str]]],
        device: torch.device,
        owner: Routing,
        hooked: dict[str, int],
    ):
        # layout: route key (adapter type, ALL_ROWS) -> (columns, features); columns > 1: a (rows, K)
        # index and weight, for "cat" rows of up to K adapters, else a (rows,) index and no weight
        self.rows = rows
        self.owner = owner  # the Routing of the Backbone that made them
        self.hooked = hooked  # route key -> modules with its hooks when made (a graph holds those only)
        self._at: dict[str, tuple[int, int, int]] = {}  # route key -> (index offset, weight offset, columns)
        at = weighted = 0
        for key, (width, _) in layout.items():
            self._at[key] = (at, weighted, width)
            at += rows * width
            weighted += rows * width if width > 1 else 0
        # Every route's index back to back (-1: no adapter), then the (rows, K) routes' weights: a block
        # writes each with one host-to-device copy.
        self.index = torch.full((at,), -1, dtype=torch.long, device=device)
        self.weight = torch.zeros(weighted, dtype=torch.float32, device=device)
        self.routes: dict[str, Route] = {}
        for key, (width, features) in layout.items():
            index, weight = self._views(key, self.index, self.weight)
            self.routes[key] = Route(
                index if width > 1 else index[:, 0], features, broadcast=False, weight=weight, live=True
            )

    def _views(self, key: str, index: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Route `key`'s part of flat `index` as (rows, columns), and of `weight` (None with one column)."""
        at, weighted, width = self._at[key]
        part = index[at : at + self.rows * width].view(self.rows, width)
        if width == 1:
            return part, None
        return part, weight[weighted : weighted + self.rows * width].view(self.rows, width)

    def write(self, routes: dict[str, Route], broadcast: bool) -> None:
        """Copies a batch's routes (made on the host by `routes_for`: one entry per row, or one for all
        rows when `broadcast`) into the buffers, in place; a route key absent from `routes` gets -1 in
        every row. An AdapterError, before anything is written, if the buffers cannot hold them."""
        index = torch.full(self.index.shape, -1, dtype=torch.long)  # host staging, laid out as the buffers
        weight = torch.zeros(self.weight.shape, dtype=torch.float32)
        for key, route in routes.items():
            self._check(key, route)
            into, into_weight = self._views(key, index, weight)
            src = route.index if route.index.dim() == 2 else route.index[:, None]  # (n, K)
            src_weight = torch.ones(src.shape) if route.weight is None else route.weight  # plain rows weigh 1
            if broadcast:
                src, src_weight = src.expand(self.rows, -1), src_weight.expand(self.rows, -1)
            into[:, : src.size(1)] = src
            if into_weight is not None:
                into_weight[:, : src.size(1)] = src_weight
        self.index.copy_(index)
        self.weight.copy_(weight)

    def _check(self, key: str, route: Route) -> None:
        mine = self.routes[key]
        missing = route.features - mine.features
        if missing:
            raise AdapterError(
                f"this batch's {key} adapters need {sorted(missing)}, and these routing buffers route {key} "
                f"without them (they take the features of the adapters resident when made); make new buffers "
                "with Backbone.routing_buffers() now that those adapters are loaded, and capture again"
            )
        wanted, width = (route.index.size(1) if route.index.dim() == 2 else 1), self._at[key][2]
        if wanted > width:
            raise AdapterError(
                f'a row of this batch composes {wanted} {key} adapters with "cat", and these routing buffers '
                f"hold {width} per row; make them with Backbone.routing_buffers(rows, columns={wanted})"
            )


def attach(module: nn.Module, slots: ModuleSlots, routing: Routing, key: str, child: str) -> None:
    """Makes `slots` the child `child` of `module` and calls its before/after hooks in batches where
    route `key` (an adapter type, or ALL_ROWS) is set."""
    module.add_module(child, slots)
    if type(slots).before is not ModuleSlots.before:

        def before(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            route = routing.routes.get(key)
            return None if route is None else slots.before(mod, args, kwargs, route)

        module.register_forward_pre_hook(before, with_kwargs=True)
    if type(slots).after is not ModuleSlots.after:

        def after(mod: nn.Module, args: tuple, output: Any) -> Any:
            route = routing.routes.get(key)
            return None if route is None else slots.after(mod, args, output, route)

        module.register_forward_hook(after)


def routes_for(
    slots: list[Slots],
    types: list[str | None],
    features: list[frozenset[str]],
    broadcast: bool,
    repeat: int,
    device: torch.device,
    lengths: list[int] | None = None,
) -> dict[str, Route]:
    """The route of each type present and ALL_ROWS, for rows using `slots` (-1 = base; a "cat"
    composition's (slot, weight) pairs) of adapter `types` that need `features`; with `lengths`,
    row i is lengths[i] tokens of one packed sequence. A type with "cat" rows gets (n, K) routes."""
    counts = None if lengths is None else torch.tensor(lengths, dtype=torch.long)

    def per_row(table: torch.Tensor) -> torch.Tensor:
        if counts is not None:
            return table.repeat_interleave(counts, dim=0)  # one entry per token
        if repeat > 1 and not broadcast:
            return table.repeat_interleave(repeat, dim=0)
        return table

    def route(of_type: str | None) -> Route:
        mine = [of_type is None or t == of_type for t in types]
        # ALL_ROWS (heads) sees a composition's row as the base: compositions have no heads
        rows = [s if m and (of_type is not None or isinstance(s, int)) else -1 for s, m in zip(slots, mine)]
        needed = frozenset().union(*(f for f, m in zip(features, mine) if m))
        if all(isinstance(s, int) for s in rows):
            index = per_row(torch.tensor(rows, dtype=torch.long))
            return Route(index.to(device), needed, broadcast, packed=counts is not None)
        pairs = [((s, 1.0),) if isinstance(s, int) else s for s in rows]
        width = max(len(p) for p in pairs)
        index = torch.full((len(pairs), width), -1, dtype=torch.long)  # (n, K)
        weight = torch.zeros(len(pairs), width, dtype=torch.float32)
        for i, row in enumerate(pairs):
            for k, (slot, w) in enumerate(row):
                index[i, k], weight[i, k] = slot, w
        return Route(
            per_row(index).to(device), needed, broadcast, packed=counts is not None, weight=per_row(weight).to(device)
        )

    everything = route(None)
    present = sorted({t for t in types if t is not None})
    if len(present) == 1 and None not in types and all(isinstance(s, int) for s in slots):
        return {present[0]: everything, ALL_ROWS: everything}
    return {**{t: route(t) for t in present}, ALL_ROWS: everything}
