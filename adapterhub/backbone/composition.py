"""A composition: one row's weighted combination of resident adapters, e.g.

    Composition.parse({"adapters": [{"name": "support", "weight": 0.7}, {"name": "legal", "weight": 0.3}],
                       "method": "ties", "density": 0.5})

The methods and their options are PEFT's `add_weighted_adapter`'s (and AdapterHub `adapters`'
`average_adapter` for bottleneck adapters); which methods an adapter type takes is its
`AdapterType.composition_methods`. A Composition is immutable and hashable, so it can key caches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AdapterError

# option -> (check, what it must be)
OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "density": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "majority_sign_method": (lambda v: v in ("total", "frequency"), '"total" or "frequency"'),
    "svd_rank": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "svd_clamp": (lambda v: _number(v) and 0 < v <= 1, "a quantile in (0, 1]"),
    "svd_full_matrices": (lambda v: isinstance(v, bool), "true or false"),
    "seed": (lambda v: _integer(v) and 0 <= v < 2**63, "an integer >= 0"),
    "normalize_weights": (lambda v: isinstance(v, bool), "true or false"),
}
NEEDS_DENSITY = ("ties", "dare", "magnitude_prune")  # methods whose names start so
MAX_INPUTS = 16


@dataclass(frozen=True)
class Composition:
    """`adapters`: (name, weight) pairs; `method`: None for the adapters' type's default (its first
    composition method: "cat" for LoRA, "linear" for IA3 and bottleneck); `options`: sorted pairs."""

    adapters: tuple[tuple[str, float], ...]
    method: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.adapters)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(weight for _, weight in self.adapters)

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def renamed(self, rename: Callable[[str], str]) -> Composition:
        """The same composition over other names for its adapters (a server's public -> resident names)."""
        return Composition(tuple((rename(n), w) for n, w in self.adapters), self.method, self.options)

    def to_json(self) -> dict:
        """The request-body form `parse` reads."""
        body: dict[str, Any] = {"adapters": [{"name": n, "weight": w} for n, w in self.adapters]}
        if self.method is not None:
            body["method"] = self.method
        return {**body, **dict(self.options)}

    @classmethod
    def parse(cls, spec: Any, where: str = "composition") -> Composition:
        """A Composition from itself or a JSON-like spec: {"adapters": [{"name", "weight"} | [name, weight]
        | name (weight 1)] or {name: weight}, "method": ..., options...}. An AdapterError names the field
        (`where` prefixes it: e.g. "the request's composition") and what it must be."""
        if isinstance(spec, Composition):
            return spec
        if not isinstance(spec, Mapping):
            raise AdapterError(f'{where} must be an object {{"adapters": [...], "method": ...}}, got {spec!r:.80}')
        unknown = sorted(set(spec) - {"adapters", "method", *OPTIONS})
        if unknown:
            raise AdapterError(
                f"{where} has unknown field(s) {unknown}; it takes adapters, method and {sorted(OPTIONS)}"
            )
        adapters = _adapters(spec.get("adapters"), f"{where}.adapters")
        method = spec.get("method")
        if method is not None and (not isinstance(method, str) or not method):
            raise AdapterError(f'{where}.method must be a method name such as "cat" or "ties", got {method!r:.80}')
        options = []
        for key in sorted(set(spec) & set(OPTIONS)):
            check, what = OPTIONS[key]
            if not check(spec[key]):
                raise AdapterError(f"{where}.{key} must be {what}, got {spec[key]!r:.80}")
            options.append((key, spec[key]))
        if method is not None and method.startswith(NEEDS_DENSITY) and "density" not in dict(options):
            raise AdapterError(f'{where}: method "{method}" prunes, so it needs a density in [0, 1] (e.g. 0.5)')
        if method is not None and method.startswith("dare") and dict(options).get("density") == 0:
            raise AdapterError(f'{where}.density must be above 0 for "{method}", which rescales by 1/density')
        return cls(adapters, method, tuple(options))


def _adapters(value: Any, where: str) -> tuple[tuple[str, float], ...]:
    if isinstance(value, Mapping):
        value = list(value.items())
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise AdapterError(f'{where} must be a non-empty list of {{"name": ..., "weight": ...}}, got {value!r:.80}')
    if len(value) > MAX_INPUTS:
        raise AdapterError(f"{where} names {len(value)} adapters; a composition takes at most {MAX_INPUTS}")
    pairs = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            name, weight = item, 1.0
        elif isinstance(item, Mapping) and set(item) <= {"name", "weight"} and "name" in item:
            name, weight = item["name"], item.get("weight", 1.0)
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            name, weight = item
        else:
            raise AdapterError(f'{where}[{i}] must be {{"name": ..., "weight": ...}}, got {item!r:.80}')
        if not isinstance(name, str) or not name:
            raise AdapterError(f"{where}[{i}].name must be an adapter's name, got {name!r:.80}")
        if not _number(weight):
            raise AdapterError(f"{where}[{i}].weight must be a finite number, got {weight!r:.80}")
        pairs.append((name, float(weight)))
    names = [n for n, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AdapterError(f"{where} names {repeated} more than once; give each adapter once, with its summed weight")
    return tuple(pairs)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
