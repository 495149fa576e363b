"""What an adapter type is: the object a plugin declares through the `adapter_types` hook.

An `AdapterType` reads and writes its on-disk format, checks an adapter against a backbone,
allocates per-module slot tensors (`ModuleSlots`) and creates fresh trainable weights. The
Backbone does the rest (slot table, LRU, host cache, routing, modules_to_save heads), the
same way for every type. See docs/writing-a-plugin.md for a complete example.

    adapter = Adapter(type="lora", config={...}, modules={"model.layers.0.self_attn.q_proj":
                      {"A": (r, in), "B": (out, r), "scale": () fp32}})
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from .errors import AdapterError


@dataclass
class Adapter:
    """One adapter as read from disk: per adapted module, the type's named tensors (on the CPU)."""

    type: str  # the AdapterType's name, e.g. "lora"
    config: dict  # its config file as read (unknown keys kept)
    modules: dict[str, dict[str, torch.Tensor]]  # module path in the model -> the type's tensors
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # path -> full state dict
    source: str = ""  # the directory, for error messages

    def to(self, device: str | torch.device) -> Adapter:
        """The same adapter with every tensor on `device` and outside autograd (the host cache keeps
        evicted adapters on the CPU; a trainer's parameters come out as plain tensors)."""
        def moved(group: dict) -> dict:
            return {path: {k: t.detach().to(device) for k, t in parts.items()} for path, parts in group.items()}
        return Adapter(type=self.type, config=self.config, modules=moved(self.modules),
                       modules_to_save=moved(self.modules_to_save), source=self.source)

    def tensors(self) -> list[torch.Tensor]:
        return [t for m in (*self.modules.values(), *self.modules_to_save.values()) for t in m.values()]

    def nbytes(self) -> int:
        """Bytes of all tensors, a tensor shared by several modules (VeRA's projections) counted once:
        what a load or swap moves, and what the host cache holds."""
        sizes = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape): t.numel() * t.element_size()
                 for t in self.tensors()}
        return sum(sizes.values())


class Route:
    """The rows of the batch in flight that use one adapter type: their slot, -1 for every other row."""

    def __init__(self, index: torch.Tensor, features: frozenset[str], broadcast: bool):
        self.index = index  # (n,) int64: the slot of each row of this type, -1 elsewhere
        self.features = features  # union of AdapterType.features over the batch's adapters of this type
        self.broadcast = broadcast  # index holds one slot for every row of any batch
        self._cache: dict[tuple, torch.Tensor] = {}

    def rows(self, n0: int, rows: int, device: torch.device) -> torch.Tensor:
        """(rows,) slot per row for x (n0, ..., features) flattened to (rows, features), on x's device
        (a model may span devices): every position of batch row i gets row i's slot."""
        if torch.compiler.is_compiling():
            return self._expand(n0, rows).to(device)
        key = (n0, rows, device)
        if key not in self._cache:
            self._cache[key] = self._expand(n0, rows).to(device)
        return self._cache[key]

    def _expand(self, n0: int, rows: int) -> torch.Tensor:
        index = self.index
        if self.broadcast:
            index = index.expand(n0).contiguous()
        elif index.size(0) != n0:
            raise ValueError(f"the batch has {n0} rows but Backbone.use routes {index.size(0)}; give one name "
                             "per row (with repeat=k when generate() expands each row k times: num_beams x "
                             "num_return_sequences), or a single name for all rows")
        return index if rows == n0 else index.repeat_interleave(rows // n0)


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

    def after(self, module: nn.Module, args: tuple, output: Any, route: Route) -> Any:
        """The module's new output (may be `output` changed in place), or None to leave it."""
        return None


class AdapterType:
    """An adapter type. Subclass it, set the class attributes, implement the methods.

    `name` is what users pass as `type=` and what `Adapter.type` holds; `aliases` are the
    PEFT `peft_type` values (or other format tags) whose directories this type reads;
    `config_schema` is a JSON Schema of the config file, checked before `read` returns.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
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
        return [(path, key) for path, parts in adapter.modules.items() for key, t in parts.items()
                if t.is_floating_point() and t.dim() > 0]

    def init(self, model: nn.Module, config: dict) -> Adapter:
        """A fresh adapter for `model` from `config` (validated against config_schema), initialised
        as the format's library does it, ready to train."""
        raise NotImplementedError


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in): transformers' Conv1D stores it transposed."""
    return module.weight.T if is_conv1d(module) else module.weight


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2): what low-rank types adapt."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def require_linear(adapter: Adapter, path: str, module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear/Conv1D target, or an AdapterError naming the adapter and module."""
    if not is_linear(module):
        raise AdapterError(f"{adapter.source}: the {adapter.type} adapter adapts {path!r}, a "
                           f"{type(module).__name__}; {adapter.type} adapts nn.Linear (and Conv1D) modules only")
    out_features, in_features = linear_weight(module).shape
    return out_features, in_features


def check_shape(adapter: Adapter, path: str, key: str, expected: tuple[int, ...]) -> None:
    """An AdapterError if adapter.modules[path][key] does not have shape `expected` for this backbone."""
    got = tuple(adapter.modules[path][key].shape)
    if got != tuple(expected):
        raise AdapterError(f"{adapter.source}: tensor {path}.{key} has shape {got}, expected {tuple(expected)} "
                           "for this backbone; was the adapter trained on another base model?")


def find_linears(model: nn.Module, target_modules: Sequence[str] | str | None) -> dict[str, nn.Module]:
    """Linear layers to adapt: by default every nn.Linear / Conv1D inside the model's repeated
    blocks (any nn.ModuleList); else names (exact or dotted suffix) or one regex (full match)."""
    linear = {name: m for name, m in model.named_modules() if is_linear(m)}
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


def linear_targets(model: nn.Module, config: dict) -> list[tuple[str, nn.Module]]:
    """The linear layers a PEFT config selects, for creating a fresh adapter: its target_modules
    with PEFT's rules, where None or "all-linear" means every linear layer in the repeated blocks."""
    from .formats.peft import is_targeted  # formats import this module

    if config.get("target_modules") in (None, "all-linear"):
        candidates = find_linears(model, None)
    else:
        candidates = {n: m for n, m in model.named_modules() if is_linear(m)}
    return [(path, m) for path, m in candidates.items() if is_targeted(config, path)]
