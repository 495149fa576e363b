"""The batch in flight, shared by every adapted module, and the hooks that hand it to them.

`Backbone.use` sets one `Route` per adapter type present in the batch (each row's slot where
the row's adapter is of that type, -1 elsewhere) and one over all rows for the heads. A
type's `ModuleSlots` on a module is called through forward hooks only when its type has rows
in the batch, so a batch of one type costs nothing in the others' modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapter_type import ModuleSlots, Route


class Routing:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}  # adapter type -> its rows; empty: no adapter in use
        self.any: Route | None = None  # every row's slot whatever its type (modules_to_save heads)

    def set(self, routes: dict[str, Route], any_route: Route | None) -> None:
        self.routes, self.any = routes, any_route

    def clear(self) -> None:
        self.routes, self.any = {}, None


def attach(module: nn.Module, slots: ModuleSlots, routing: Routing, type_name: str) -> None:
    """Makes `slots` a child of `module` and calls its before/after hooks for batches with `type_name` rows."""
    module.add_module(f"adapterhub_{type_name}", slots)
    if type(slots).before is not ModuleSlots.before:
        def before(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            route = routing.routes.get(type_name)
            return None if route is None else slots.before(mod, args, kwargs, route)
        module.register_forward_pre_hook(before, with_kwargs=True)
    if type(slots).after is not ModuleSlots.after:
        def after(mod: nn.Module, args: tuple, output: Any) -> Any:
            route = routing.routes.get(type_name)
            return None if route is None else slots.after(mod, args, output, route)
        module.register_forward_hook(after)


def routes_for(slots: list[int], types: list[str | None], features: list[frozenset[str]], broadcast: bool,
               repeat: int, device: torch.device) -> tuple[dict[str, Route], Route]:
    """Per-type routes and the all-rows route for rows using `slots` (-1 = base) of adapter `types`
    that need `features`."""
    def route(of_type: str | None) -> Route:
        values = [s if of_type is None or t == of_type else -1 for s, t in zip(slots, types)]
        index = torch.tensor(values, dtype=torch.long, device=device)
        index = index.repeat_interleave(repeat) if repeat > 1 and not broadcast else index
        needed = frozenset().union(*(f for f, t in zip(features, types) if of_type is None or t == of_type))
        return Route(index, needed, broadcast)

    everything = route(None)
    present = sorted({t for t in types if t is not None})
    if len(present) == 1 and None not in types:
        return {present[0]: everything}, everything
    return {t: route(t) for t in present}, everything
