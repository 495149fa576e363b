"""The batch in flight, shared by every adapted module, and the hooks that hand it to their slots.

`Backbone.use` sets one `Route` per adapter type present in the batch (each row's slot where the
row's adapter is of that type, -1 elsewhere) and one over all rows (`ALL_ROWS`, for the
modules_to_save heads). The slot tensors of a type on a module (its `ModuleSlots`) are called
through forward hooks only when their route is set, so a batch of one type costs nothing in the
others' modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
