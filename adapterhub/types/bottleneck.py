"""Bottleneck adapters (Pfeiffer `seq_bn`, Houlsby `double_seq_bn`) in AdapterHub `adapters`' format.

One adapter at one location maps the sublayer output h, with the sublayer's residual input `inp`
and the block's own LayerNorm LN (None in pre-norm decoder layers), as adapters does:

    z = LN(h + inp) if original_ln_before else h               (without LN: h + inp)
    residual = h | z | h + inp                                  residual_before_ln True | False | "post_add"
    y = scaling * (W_up act(W_down z + b_down) + b_up) + residual       shrink -> act -> expand
    out = LN(y + inp) if original_ln_after else y               (without LN: y + inp)

Post-norm output blocks (BERT's `attention.output` / `output`, LN(dropout(dense(x)) + inp)): the
block's output becomes `out`; h is the dropout's output, captured by a hook. Pre-norm decoder
layers (Llama: x + self_attn(..), then + mlp(..)): the attention (then the MLP) output becomes
out - inp, so that the layer's own residual add gives `out`; inp is the input of the norm before
it. With original_ln_after (both presets) that is y itself, without a subtraction.

Settings may differ per slot (a batch mixes seq_bn and double_seq_bn rows): each is a per-slot
tensor, applied per row with torch.where; rows of other types and of the base keep the module's
own output exactly. The down and up projections are the gathered low-rank ops; while autograd
records (training) the same computation runs in differentiable PyTorch, one gathered matmul per
sequence. Adapter dropout and stochastic depth (training-time regularisers) are not applied.

Module paths are those adapters saved: the model's own, with or without its base model's prefix
(`bert.`, `model.`); `BottleneckType.place` moves them onto a given model, as adapters' loader does.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import ops
from ..errors import AdapterError
from ..formats import Adapter, check_config, check_shape, is_linear
from ..formats.bottleneck import (
    ACTIVATIONS,
    LOCATIONS,
    PARAMS,
    PICKLE_FILE,
    PRESETS,
    RESIDUAL,
    SCHEMA,
    SETTINGS,
    VERSION,
    WEIGHTS_FILE,
    activation,
    is_attention,
    read_bottleneck,
    resolve_config,
    settings,
    split_tensor,
    write_bottleneck,
)
from ..plugins.contract import AdapterType, ModuleSlots, Route
from ..plugins.hookspecs import hookimpl

LAYER_CHILDREN = frozenset({"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"})
BLOCK_CHILDREN = frozenset({"dense", "dropout", "LayerNorm"})
ATTENTION, OUTPUT = "attention", "output"  # route features: the batch has adapters at that location


def site_kind(module: nn.Module, path: str) -> str | None:
    """ "block" (a layer's post-norm `attention.output` or `output` block), "layer" (a pre-norm decoder
    layer) or None: where adapters go. Other post-norm blocks (cross-attention, heads) take none."""
    children = {name for name, _ in module.named_children() if not name.startswith("adapterhub_")}
    if children == LAYER_CHILDREN:
        return "layer"
    if (
        children == BLOCK_CHILDREN
        and isinstance(module.LayerNorm, nn.LayerNorm)
        and is_linear(module.dense)
        and re.search(r"(^|\.)\d+\.(attention\.)?output$", path)
    ):
        return "block"
    return None


def site_hidden(module: nn.Module) -> int:
    """The hidden size H the adapters of a site read and write."""
    if hasattr(module, "LayerNorm"):
        return module.LayerNorm.normalized_shape[-1]
    return module.post_attention_layernorm.weight.size(-1)


class Bottleneck(nn.Module):
    """One adapter location's slots: down (slots, R, H), up (slots, H, R), their biases, and per slot
    the scaling, rank (0: no adapter here) and mode (ln_before, ln_after, residual, activation)."""

    def __init__(self, hidden: int, slots: int, max_rank: int, like: torch.Tensor):
        super().__init__()
        self.hidden = hidden
        kw = dict(device=like.device, dtype=like.dtype)
        for name, shape in (
            ("down", (slots, max_rank, hidden)),
            ("down_bias", (slots, max_rank)),
            ("up", (slots, hidden, max_rank)),
            ("up_bias", (slots, hidden)),
        ):
            self.register_buffer(name, torch.zeros(shape, **kw), persistent=False)
        self.register_buffer("scale", torch.zeros(slots, dtype=torch.float32, device=like.device), persistent=False)
        self.register_buffer("ranks", torch.zeros(slots, dtype=torch.int64, device=like.device), persistent=False)
        self.register_buffer("mode", torch.zeros(slots, 4, dtype=torch.int64, device=like.device), persistent=False)

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        """PARAMS and SETTINGS tensors into `slot`, or None: no adapter at this location."""
        r = 0 if tensors is None else tensors[PARAMS[0]].size(0)
        if r:
            self.down[slot, :r].copy_(tensors[PARAMS[0]])
            self.down_bias[slot, :r].copy_(tensors[PARAMS[1]])
            self.up[slot, :, :r].copy_(tensors[PARAMS[2]])
            self.up_bias[slot].copy_(tensors[PARAMS[3]])
            self.scale[slot] = float(tensors["scaling"])
            self.mode[slot].copy_(tensors["mode"])
        self.ranks[slot] = r

    def read(self, slot: int) -> dict[str, torch.Tensor] | None:
        r = int(self.ranks[slot])
        if r == 0:
            return None
        return {
            PARAMS[0]: self.down[slot, :r].clone(),
            PARAMS[1]: self.down_bias[slot, :r].clone(),
            PARAMS[2]: self.up[slot, :, :r].clone(),
            PARAMS[3]: self.up_bias[slot].clone(),
            "scaling": self.scale[slot].double(),
            "mode": self.mode[slot].clone(),
        }

    def apply(
        self, h: torch.Tensor, inp: torch.Tensor, norm: nn.Module | None, original: torch.Tensor, route: Route
    ) -> torch.Tensor:
        """`original` (n0, ..., H) with each adapted row replaced by the adapter's output around
        h (n0, ..., H) and inp; norm: the block's LayerNorm, or None in a pre-norm layer, whose
        caller adds inp (so rows get out - inp there)."""
        h2, inp2 = h.reshape(-1, self.hidden), inp.reshape(-1, self.hidden)  # (rows, H)
        index = route.rows(h.size(0), h2.size(0), h.device)  # (rows,)
        slot = index.clamp(min=0)
        mode = self.mode[slot]  # (rows, 4)
        total = h2 + inp2
        z = torch.where(mode[:, 0:1] == 1, total if norm is None else norm(total), h2)
        residual = torch.where(
            mode[:, 2:3] == RESIDUAL[True], h2, torch.where(mode[:, 2:3] == RESIDUAL[False], z, total)
        )
        scale = self.scale[slot].unsqueeze(1)  # (rows, 1)
        y = (residual + (scale * self.up_bias[slot]).to(residual.dtype)).contiguous()  # (rows, H)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (h, inp, *self.buffers())):
            # Training: the same computation in differentiable PyTorch, one gathered matmul per sequence.
            n0, sequence = h.size(0), route.rows(h.size(0), h.size(0), h.device)  # (n0,)
            t = _per_sequence(z.reshape(n0, -1, self.hidden), self.down, sequence).reshape(z.size(0), -1)
            acc = torch.promote_types(t.dtype, torch.float32)  # the ops' intermediate dtype
            t = _activate(t.to(acc) + self.down_bias[slot].to(acc), mode[:, 3], route.features)  # (rows, R)
            up = _per_sequence(t.to(y.dtype).reshape(n0, -1, t.size(1)), self.up, sequence)  # (n0, L, H)
            y = y + scale.to(y.dtype) * up.reshape_as(y)
        else:
            t = ops.lora_shrink(z.contiguous(), self.down, index, self.ranks)  # (rows, R) fp32
            t = _activate(t + self.down_bias[slot].to(t.dtype), mode[:, 3], route.features)
            ops.lora_expand(y, t, self.up, self.scale, index, self.ranks)
        ln_after = mode[:, 1:2] == 1
        out = torch.where(ln_after, norm(y + inp2), y) if norm is not None else torch.where(ln_after, y, y - inp2)
        adapted = ((index >= 0) & (self.ranks[slot] > 0)).unsqueeze(1)  # (rows, 1)
        return torch.where(adapted, out, original.reshape(-1, self.hidden)).view_as(original)


def _per_sequence(x: torch.Tensor, weight: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """x (n0, L, k) @ weight[sequence[i]].T for each sequence i, weight (slots, m, k) -> (n0, L, m);
    sequences with slot -1 get zeros. Columns past a slot's rank are zero in the slot tensors."""
    chosen = weight[sequence.clamp(min=0)] * (sequence >= 0).to(weight.dtype)[:, None, None]  # (n0, m, k)
    return torch.einsum("nlk,nmk->nlm", x, chosen)


def _activate(t: torch.Tensor, act: torch.Tensor, features: frozenset[str]) -> torch.Tensor:
    """Each row's activation (act (rows,) indexes ACTIVATIONS) of t (rows, R); the batch's set is in `features`."""
    names = sorted(f.removeprefix("act:") for f in features if f.startswith("act:"))
    out = activation(names[0])(t)
    for name in names[1:]:
        out = torch.where(act.unsqueeze(1) == ACTIVATIONS.index(name), activation(name)(t), out)
    return out


class BlockSlots(ModuleSlots):
    """Slots of a post-norm output block, LayerNorm(dropout(dense(x)) + input_tensor) (BERT's
    BertSelfOutput, BertOutput): the adapter takes over its residual add and LayerNorm. h, the
    dropout's output, is captured by a hook on `dropout` during batches with bottleneck rows."""

    def __init__(self, block: nn.Module, location: str, slots: int, max_rank: int):
        super().__init__()
        self.location = location  # ATTENTION or OUTPUT
        self.adapter = Bottleneck(site_hidden(block), slots, max_rank, block.dense.weight)
        self._inp: torch.Tensor | None = None  # the block's input_tensor, set while a routed forward runs
        self._h: torch.Tensor | None = None
        # Registered before the Backbone's hooks, so it runs first in every forward: a forward that
        # raised half-way leaves nothing behind for the next one.
        block.register_forward_pre_hook(self._reset)
        block.dropout.register_forward_hook(self._capture)

    def _reset(self, module: nn.Module, args: tuple) -> None:
        self._inp = self._h = None

    def _capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._inp is not None:
            self._h = output

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        self.adapter.write(slot, tensors)

    def read(self, slot: int) -> dict[str, torch.Tensor] | None:
        return self.adapter.read(slot)

    def before(self, module: nn.Module, args: tuple, kwargs: dict, route: Route) -> None:
        if self.location in route.features:
            self._inp = args[1] if len(args) > 1 else kwargs["input_tensor"]
        return None

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor, route: Route) -> torch.Tensor | None:
        h, inp = self._h, self._inp
        self._reset(module, args)
        if h is None:
            return None
        return self.adapter.apply(h, inp, module.LayerNorm, output, route)


class LayerSlots(ModuleSlots):
    """Slots of a pre-norm decoder layer (Llama): `attention_adapters` change self_attn's output and
    `output_adapters` the mlp's; their residual inputs are the inputs of input_layernorm and
    post_attention_layernorm. Hooks on those children act while the layer runs a routed batch."""

    def __init__(self, layer: nn.Module, slots: int, max_rank: int):
        super().__init__()
        like = next(layer.mlp.parameters())
        for location in LOCATIONS:
            self.add_module(location, Bottleneck(site_hidden(layer), slots, max_rank, like))
        self._route: Route | None = None  # the batch, while the layer runs one with bottleneck rows
        self._inp: dict[str, torch.Tensor] = {}
        layer.register_forward_pre_hook(self._reset)  # runs first in every forward, as in BlockSlots
        layer.input_layernorm.register_forward_hook(lambda m, args, out: self._capture(LOCATIONS[0], args[0]))
        layer.post_attention_layernorm.register_forward_hook(lambda m, args, out: self._capture(LOCATIONS[1], args[0]))
        layer.self_attn.register_forward_hook(lambda m, args, out: self._adapt(LOCATIONS[0], ATTENTION, out))
        layer.mlp.register_forward_hook(lambda m, args, out: self._adapt(LOCATIONS[1], OUTPUT, out))

    def _reset(self, module: nn.Module, args: tuple) -> None:
        self._route = None
        self._inp.clear()

    def _capture(self, location: str, inp: torch.Tensor) -> None:
        if self._route is not None:
            self._inp[location] = inp

    def _adapt(self, location: str, feature: str, output: Any) -> Any:
        route = self._route
        if route is None or feature not in route.features:
            return None
        h = output[0] if isinstance(output, tuple) else output
        new = getattr(self, location).apply(h, self._inp.pop(location), None, h, route)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        for location in LOCATIONS:
            own = {}
            for name, t in (tensors or {}).items():
                where, param = split_tensor(name)
                if where == location:
                    own[param] = t
            getattr(self, location).write(slot, {**own, **{k: tensors[k] for k in SETTINGS}} if own else None)

    def read(self, slot: int) -> dict[str, torch.Tensor] | None:
        tensors = {}
        for location in LOCATIONS:
            found = getattr(self, location).read(slot) or {}
            tensors.update({(name if name in SETTINGS else f"{location}.{name}"): t for name, t in found.items()})
        return tensors or None

    def before(self, module: nn.Module, args: tuple, kwargs: dict, route: Route) -> None:
        self._route = route
        return None

    def after(self, module: nn.Module, args: tuple, output: Any, route: Route) -> None:
        self._reset(module, args)
        return None


class BottleneckType(AdapterType):
    name = "bottleneck"
    packed = True  # routes per position (Route.rows), so it runs in the server's packed steps
    config_schema = SCHEMA
    description = "Bottleneck adapters (AdapterHub adapters format): seq_bn (Pfeiffer), double_seq_bn (Houlsby)"

    def read(self, directory: Path, *, allow_pickle: bool = False) -> Adapter:
        return read_bottleneck(Path(directory), self.name, allow_pickle)

    def write(self, adapter: Adapter, directory: Path) -> None:
        write_bottleneck(adapter, Path(directory))

    def features(self, adapter: Adapter) -> frozenset[str]:
        """The activation, and the locations (ATTENTION, OUTPUT) that have adapters."""
        where = {
            ATTENTION if is_attention(path, name) else OUTPUT
            for path, parts in adapter.modules.items()
            for name in parts
            if name not in SETTINGS
        }
        return frozenset({f"act:{adapter.config['config']['non_linearity']}", *where})

    def rank(self, adapter: Adapter) -> int:
        return max(
            (
                t.size(0)
                for parts in adapter.modules.values()
                for name, t in parts.items()
                if split_tensor(name)[1] == PARAMS[0]
            ),
            default=0,
        )

    def check(self, adapter: Adapter, model: nn.Module) -> None:
        for path, parts in adapter.modules.items():
            module = model.get_submodule(path)
            kind = site_kind(module, path)
            if kind is None:
                raise AdapterError(
                    f"{adapter.source}: the bottleneck adapter adapts {path!r}, a "
                    f"{type(module).__name__}; bottleneck adapters go on a layer's post-norm "
                    f"`attention.output` and `output` blocks (children {sorted(BLOCK_CHILDREN)}, as "
                    f"BERT's) or on pre-norm decoder layers (children {sorted(LAYER_CHILDREN)}, "
                    "as Llama's)"
                )
            hidden = site_hidden(module)
            for name in parts:
                location, param = split_tensor(name)
                if name in SETTINGS:
                    continue
                if (location != "") != (kind == "layer"):
                    raise AdapterError(
                        f"{adapter.source}: tensor {path}.{name}: a {kind} takes adapters "
                        f"{'at ' + str(list(LOCATIONS)) if kind == 'layer' else 'of its own'}; was the "
                        "adapter trained on another architecture?"
                    )
                r = parts[f"{location}.{PARAMS[0]}" if location else PARAMS[0]].size(0)
                check_shape(adapter, path, name, dict(zip(PARAMS, ((r, hidden), (r,), (hidden, r), (hidden,))))[param])
            if kind == "layer" and adapter.config["config"]["residual_before_ln"] == "post_add":
                raise AdapterError(
                    f"{adapter.source}: config.residual_before_ln='post_add' needs the block's own "
                    f"LayerNorm, and {path!r} ({type(module).__name__}) has none there; adapters "
                    "fails on it too: use True or False"
                )

    def composition_methods(self) -> tuple[str, ...]:
        return ("linear",)

    def compose(self, adapters: list[Adapter], weights: list[float], method: str, options: dict) -> Adapter:
        """adapters' `average_adapter` (combine_strategy "linear"): every weight and bias is
        sum_k w_k theta_k, the weights divided by their sum unless normalize_weights is false.
        As there, the adapters must share one config (dropout and init aside) and one set of modules."""
        first = adapters[0]
        for adapter in adapters[1:]:
            if _averaged_config(adapter) != _averaged_config(first):
                raise AdapterError(
                    f"cannot average bottleneck adapters with different configurations ({first.source}: "
                    f"{_averaged_config(first)}; {adapter.source}: {_averaged_config(adapter)}), as adapters cannot"
                )
            if {p: sorted(m) for p, m in adapter.modules.items()} != {p: sorted(m) for p, m in first.modules.items()}:
                raise AdapterError(
                    f"cannot average bottleneck adapters at different modules ({first.source} and {adapter.source})"
                )
        total = sum(weights) if options.get("normalize_weights", True) else 1.0
        if total == 0:
            raise AdapterError("the weights of a bottleneck average sum to 0; give weights with a non-zero sum")
        modules = {}
        for path, parts in first.modules.items():
            modules[path] = {
                name: tensor.clone()
                if name in SETTINGS
                else sum(a.modules[path][name] * (w / total) for a, w in zip(adapters, weights))
                for name, tensor in parts.items()
            }
        return Adapter(type=self.name, config=dict(first.config), modules=modules, source=f"composition ({method})")

    def allocate(self, module: nn.Module, path: str, slots: int, max_rank: int) -> ModuleSlots:
        kind = site_kind(module, path)
        if kind == "layer":
            return LayerSlots(module, slots, max_rank)
        if kind == "block":
            return BlockSlots(module, ATTENTION if is_attention(path, "") else OUTPUT, slots, max_rank)
        raise AdapterError(
            f"bottleneck adapters go on post-norm output blocks or pre-norm decoder layers; {path!r} "
            f"is a {type(module).__name__}"
        )

    def init(self, model: nn.Module, config: dict) -> Adapter:
        """A fresh adapter at every site the config places (seq_bn unless `config["config"]` says
        otherwise: a preset name or BnConfig fields over seq_bn), initialised as init_weights says."""
        config = {"config": "seq_bn", **config}
        check_config(config, SCHEMA, "init config")
        inner = resolve_config(config["config"], PRESETS["seq_bn"], "init config")
        if inner["inv_adapter"]:
            raise AdapterError(
                f"init config: config.inv_adapter={inner['inv_adapter']!r}: invertible adapters "
                "cannot be created; set it to null"
            )
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for path, module in model.named_modules():
            kind = site_kind(module, path)
            if kind is None:
                continue
            layer = _layer_index(path)
            if layer in inner["leave_out"]:
                continue
            hidden, like = site_hidden(module), next(module.parameters())
            r = max(int(hidden // _reduction(inner, layer)), 1)
            prefixes = [f"{location}." for location in LOCATIONS] if kind == "layer" else [""]
            for prefix in prefixes:
                if inner["mh_adapter" if is_attention(path, prefix) else "output_adapter"]:
                    weights = _init_weights(inner, r, hidden, like.dtype)
                    modules.setdefault(path, {}).update({prefix + p: t for p, t in zip(PARAMS, weights)})
        if not modules:
            raise AdapterError(
                f"init: {type(model).__name__} has no post-norm output block or pre-norm decoder layer "
                "that the config places an adapter on (mh_adapter, output_adapter, leave_out)"
            )
        for parts in modules.values():
            parts.update(settings(inner))
        model_config = getattr(model, "config", None)
        file_config = {
            "config": inner,
            "hidden_size": site_hidden(model.get_submodule(next(iter(modules)))),
            "model_class": type(model).__name__,
            "model_name": getattr(model_config, "name_or_path", "") or "",
            "model_type": getattr(model_config, "model_type", None),
            "name": config.get("name", self.name),
            "version": VERSION,
        }
        return Adapter(type=self.name, config=file_config, modules=modules, source="init")

    def place(self, adapter: Adapter, model: nn.Module) -> Adapter:
        """`adapter` with its module paths moved onto `model`: adapters saves the paths of the model it
        ran on, with or without the base model's prefix (`bert.`, `model.`), and loads them either way."""
        names = {name for name, _ in model.named_modules()}
        prefix = getattr(model, "base_model_prefix", "")
        moved = {}
        for path, parts in adapter.modules.items():
            candidates = [path, f"{prefix}.{path}", path.removeprefix(f"{prefix}.")] if prefix else [path]
            moved[next((c for c in candidates if c in names), path)] = parts
        return Adapter(
            type=adapter.type,
            config=adapter.config,
            modules=moved,
            modules_to_save=adapter.modules_to_save,
            source=adapter.source,
        )


def _averaged_config(adapter: Adapter) -> dict:
    """What must agree for adapters to average: the config without dropout and initialisation."""
    ignored = ("dropout", "init_weights", "init_weights_seed")
    return {k: v for k, v in adapter.config["config"].items() if k not in ignored}


def _layer_index(path: str) -> int:
    """The transformer layer a site belongs to: the last number in its path (`bert.encoder.layer.3.output`)."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", path)
    return int(numbers[-1]) if numbers else 0


def _reduction(config: dict, layer: int) -> float:
    """reduction_factor for `layer`: a number, or {"<layer>": rf, "default": rf} as adapters reads it."""
    factor = config["reduction_factor"]
    if not isinstance(factor, dict):
        return factor
    if str(layer) not in factor and "default" not in factor:
        raise AdapterError(
            f'init config: config.reduction_factor {factor} has no entry for layer {layer} and no "default"; add one'
        )
    return factor.get(str(layer), factor.get("default"))


def _init_weights(config: dict, r: int, hidden: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """(down (r, H), down_bias (r,), up (H, r), up_bias (H,)) as adapters' init_weights does."""
    seed = config["init_weights_seed"]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    down, up = torch.empty(r, hidden), torch.empty(hidden, r)
    method = config["init_weights"]
    if method == "bert":
        nn.init.normal_(down, 0.0, 0.02, generator=generator)
        nn.init.normal_(up, 0.0, 0.02, generator=generator)
    elif method == "mam_adapter":
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(up)
    else:  # houlsby
        nn.init.trunc_normal_(down, 0.0, 1e-2, -2e-2, 2e-2, generator=generator)
        nn.init.trunc_normal_(up, 0.0, 1e-2, -2e-2, 2e-2, generator=generator)
    return [t.to(dtype) for t in (down, torch.zeros(r), up, torch.zeros(hidden))]


@hookimpl
def adapter_types() -> list[AdapterType]:
    return [BottleneckType()]


@hookimpl
def recognize_adapter(directory: Path, config: dict | None) -> str | None:
    """adapters' bottleneck directories: a "config" that is a bottleneck config (no "architecture",
    or a preset name), saved by adapters ("version": "adapters.x") or next to its weight files."""
    if not isinstance(config, dict):
        return None
    inner = config.get("config")
    bottleneck = (
        inner in PRESETS
        if isinstance(inner, str)
        else (isinstance(inner, dict) and inner.get("architecture") in (None, "bottleneck"))
    )
    saved = str(config.get("version", "")).startswith("adapters.") or any(
        (Path(directory) / f).is_file() for f in (WEIGHTS_FILE, PICKLE_FILE)
    )
    return "bottleneck" if bottleneck and saved else None
