"""Transfer-learning strategies: what trains, at which learning rate, and what is saved.

Each is a small object used by `fit` (and usable with transformers.Trainer through
`param_groups` and `StrategyCallback`):
    attach(model)          once: freeze / unfreeze, create adapters
    param_groups(lr)       the optimizer's parameter groups ("lr" per group)
    on_epoch(epoch)        per-epoch changes (progressive unfreezing)
    routing(adapters)      the context a batch runs in (the Backbone's per-row routing)
    state() / load_state() the trained tensors, for checkpoints
    save(directory)        the result: an adapter in PEFT format, a head, or save_pretrained
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..backbone import Backbone
from ..backbone.trainable import Trainable
from ..plugins import registry
from .errors import TrainingError
from .groups import layer_groups

HEADS = ("classifier", "score")  # the task heads of *ForSequenceClassification models
HEAD_FILE, HEAD_CONFIG = "head.safetensors", "head_config.json"


class Strategy:
    default_lr: float = 1e-3

    def attach(self, model: nn.Module) -> None:
        self.model = model

    def param_groups(self, lr: float) -> list[dict]:
        raise NotImplementedError

    def on_epoch(self, epoch: int) -> None:
        """Called before each epoch (0-based), also when resuming."""

    def check_adapters(self, adapters: set[str | None]) -> None:
        """Raises TrainingError if examples name adapters (their "adapter" field) this strategy does not train."""
        if adapters - {None}:
            raise TrainingError(
                f"examples name adapters {sorted(adapters - {None})}, but {type(self).__name__} "
                'trains no adapters; use AdapterTuning(names=...) or drop the "adapter" field'
            )

    def routing(self, adapters: Sequence[str | None]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups(1.0) for p in group["params"]]

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.detach().clone() for p in self.parameters()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor)

    def save(self, directory: Path) -> None:
        raise NotImplementedError


def task_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classification head a *ForSequenceClassification model adds to its base model."""
    for name in HEADS:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise TrainingError(
        f"{type(model).__name__} has no task head ({' or '.join(HEADS)}) to train; feature "
        "extraction trains a new head on a frozen backbone: load it with "
        "AutoModelForSequenceClassification(num_labels=...)"
    )


class FeatureExtraction(Strategy):
    """The backbone frozen as a feature extractor, only a new task head trained (Yosinski et al. 2014,
    "How transferable are features in deep neural networks?"; the linear-probe baseline).

    Saved as the head's tensors keyed as in the model's state_dict (head.safetensors): PEFT has no
    head-only format (it refuses a config without target modules); `model.load_state_dict(
    safetensors.torch.load_file(dir / "head.safetensors"), strict=False)` loads it back."""

    default_lr = 2e-3

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.head_name, self.head = task_head(model)
        model.requires_grad_(False)
        self.head.requires_grad_(True)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.head.parameters()), "lr": lr, "name": self.head_name}]

    def save(self, directory: Path) -> None:
        save_file(
            {f"{self.head_name}.{k}": v.detach().contiguous() for k, v in self.head.state_dict().items()},
            directory / HEAD_FILE,
        )
        (directory / HEAD_CONFIG).write_text(
            json.dumps(
                {"strategy": "feature_extraction", "head": self.head_name, "base_model": _model_name(self.model)},
                indent=2,
            )
            + "\n"
        )


class FullFineTuning(Strategy):
    """Every parameter trained at a learning rate `ratio` times smaller than training from scratch
    (`scratch_lr`): 10-100x smaller is the range the fine-tuning literature uses (Howard & Ruder
    2018, "Universal Language Model Fine-tuning"; Devlin et al. 2019 fine-tune BERT at 2e-5..5e-5
    after pre-training at 1e-4). `fit` adds warm-up and linear decay. Saved with save_pretrained."""

    def __init__(self, scratch_lr: float = 1e-3, ratio: float = 30.0):
        if not ratio >= 1:
            raise TrainingError(
                f"FullFineTuning(ratio={ratio}): the ratio divides the from-scratch learning rate; "
                "use a value in 10..100"
            )
        self.scratch_lr, self.ratio = scratch_lr, ratio
        self.default_lr = scratch_lr / ratio

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        model.requires_grad_(True)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": lr, "name": "all"}]

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)


class DiscriminativeLR(Strategy):
    """Every layer group trained, each at its own rate: lr at the top, divided by `decay` per group
    towards the input (Howard & Ruder 2018, ULMFiT: decay 2.6). Saved with save_pretrained."""

    default_lr = 1e-4

    def __init__(self, decay: float = 2.6):
        if decay < 1:
            raise TrainingError(
                f"DiscriminativeLR(decay={decay}): the decay divides the rate per group towards "
                "the input; use a value >= 1 (2.6 in ULMFiT)"
            )
        self.decay = decay

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.groups = layer_groups(model)  # input -> output
        model.requires_grad_(True)

    def param_groups(self, lr: float) -> list[dict]:
        top = len(self.groups) - 1
        return [
            {"params": params, "lr": lr / self.decay ** (top - k), "name": f"group {k}"}
            for k, params in enumerate(self.groups)
        ]

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)


class ProgressiveUnfreezing(DiscriminativeLR):
    """ULMFiT's gradual unfreezing (Howard & Ruder 2018): the top layer group trains first, and each
    `epochs_per_group` epochs the next group below is unfrozen; with discriminative rates (`decay`,
    1 for one rate). Saved with save_pretrained."""

    def __init__(self, decay: float = 2.6, epochs_per_group: int = 1):
        super().__init__(decay)
        if epochs_per_group < 1:
            raise TrainingError(f"ProgressiveUnfreezing(epochs_per_group={epochs_per_group}): use 1 or more")
        self.epochs_per_group = epochs_per_group

    def trainable_count(self) -> int:
        """Parameters of the groups unfrozen so far (all of them once enough epochs have run)."""
        return sum(p.numel() for group in self.groups for p in group if p.requires_grad)

    def on_epoch(self, epoch: int) -> None:
        unfrozen = 1 + epoch // self.epochs_per_group  # groups from the top
        for k, params in enumerate(self.groups):
            for p in params:
                p.requires_grad_(k >= len(self.groups) - unfrozen)


class AdapterTuning(Strategy):
    """Adapters of any installed type (LoRA, IA3, bottleneck, prompt tuning, plugins) trained on a
    frozen backbone inside Backbone slots, through the same slot code and ops as inference (Houlsby
    et al. 2019; Hu et al. 2021; Lester et al. 2021). Several `names` train at once, one per batch
    row (an example's "adapter" field), each row's gradients reaching its own slot only. A
    classifier's task head is trained per adapter, as PEFT's modules_to_save. Saved in the type's
    format (PEFT's for the PEFT types): one directory per adapter when there are several."""

    default_lr = 1e-3

    def __init__(
        self,
        type: str = "lora",
        config: dict | None = None,
        names: Sequence[str] = ("adapter",),
        *,
        backbone: Backbone | None = None,
        max_rank: int | None = None,
    ):
        """`backbone`: train in this Backbone's slots (of `model`) instead of a new one sized for
        `names`; `max_rank`: its slot width, by default the width the config's adapter needs."""
        self.type, self.config, self.names = type, dict(config or {}), list(names)
        self.backbone, self.max_rank = backbone, max_rank
        if not self.names:
            raise TrainingError("AdapterTuning needs at least one adapter name")

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        config = dict(self.config)
        if self.backbone is None:
            adapter_type = registry().get(self.type)
            rank = self.max_rank or max(adapter_type.rank(adapter_type.init(model, dict(config))), 1)
            self.backbone = Backbone(model, max_adapters=len(self.names), max_rank=rank, preallocate=())
        elif self.backbone.model is not model:
            raise TrainingError("AdapterTuning(backbone=...) wraps another model than the one being trained")
        if type(model).__name__.endswith("ForSequenceClassification") and not config.get("modules_to_save"):
            config["modules_to_save"] = [task_head(model)[0]]
        for name in self.names:
            if name not in self.backbone.names:
                self.backbone.create(name, self.type, config)
        self._stack = contextlib.ExitStack()
        self.trainable: Trainable = self._stack.enter_context(self.backbone.training(self.names))

    def detach(self) -> None:
        """Ends training: the trained weights stay in their slots, ready to serve."""
        self._stack.close()

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": self.trainable.parameters(name), "lr": lr, "name": name} for name in self.names]

    def check_adapters(self, adapters: set[str | None]) -> None:
        unknown = sorted(adapters - {None} - set(self.names))
        if unknown:
            raise TrainingError(
                f"examples name adapters {unknown}, which this AdapterTuning does not train "
                f'(names={self.names}); add them to names or fix the examples\' "adapter" field'
            )

    def routing(self, adapters: Sequence[str | None]) -> contextlib.AbstractContextManager:
        rows = [a if a is not None else self.names[0] for a in adapters]  # unnamed rows: the first adapter
        return self.backbone.use(rows[0] if len(set(rows)) == 1 else rows)

    def state(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}/{key}": p.detach().clone()
            for name in self.names
            for key, p in self.trainable.named_parameters(name).items()
        }

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in self.names:
                for key, p in self.trainable.named_parameters(name).items():
                    p.copy_(state[f"{name}/{key}"])

    def save(self, directory: Path) -> None:
        for name in self.names:
            adapter = self.trainable.adapter(name)
            target = directory if len(self.names) == 1 else directory / name
            self.backbone.types.get(adapter.type).write(adapter, target)


class DomainAdaptation(Strategy):
    """Continued language-model training of the adapter on unlabelled target-domain text before the
    task tuning (Gururangan et al. 2020, "Don't Stop Pretraining"; ULMFiT's LM fine-tuning stage):
    `fit` first runs `epochs` epochs of next-token loss on `texts`, then the task. Needs a causal LM."""

    def __init__(self, strategy: AdapterTuning, texts: Sequence[str], epochs: int = 1):
        if not isinstance(strategy, AdapterTuning):
            raise TrainingError("DomainAdaptation adapts an adapter: give it an AdapterTuning strategy")
        if not texts:
            raise TrainingError("DomainAdaptation needs unlabelled target-domain texts; got none")
        self.inner, self.texts, self.epochs = strategy, list(texts), epochs
        self.default_lr = strategy.default_lr

    def attach(self, model: nn.Module) -> None:
        if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
            raise TrainingError(
                f"DomainAdaptation continues language-model training, and {type(model).__name__} "
                "has no language-model head; load the backbone with AutoModelForCausalLM"
            )
        super().attach(model)
        self.inner.attach(model)

    def detach(self) -> None:
        self.inner.detach()

    def param_groups(self, lr: float) -> list[dict]:
        return self.inner.param_groups(lr)

    def check_adapters(self, adapters: set[str | None]) -> None:
        self.inner.check_adapters(adapters)

    def routing(self, adapters: Sequence[str | None]) -> contextlib.AbstractContextManager:
        return self.inner.routing(adapters)

    def state(self) -> dict[str, torch.Tensor]:
        return self.inner.state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state(state)

    def save(self, directory: Path) -> None:
        self.inner.save(directory)


def _model_name(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__


@contextlib.contextmanager
def attached(strategy: Strategy, model: nn.Module) -> Iterator[Strategy]:
    """`strategy` attached to `model` for the block; adapters end up resident in their slots."""
    strategy.attach(model)
    try:
        yield strategy
    finally:
        detach = getattr(strategy, "detach", None)
        if detach is not None:
            detach()
