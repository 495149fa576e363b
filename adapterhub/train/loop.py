"""fit: the training loop every strategy runs in.

AdamW over the strategy's parameter groups, linear warm-up then linear decay, gradient clipping,
a tqdm bar with loss and throughput, evaluation after each epoch, the best result kept in
output_dir/best (written whole, then renamed), the training state in output_dir/checkpoint after
each epoch (and every `checkpoint_every` steps), so that a run killed at any point resumes from
its last checkpoint and, with the same seed, gives the same loss curve as one never stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_directory, load_state, rng_state, save_state, set_rng_state
from .data import CAUSAL_LM, CLASSIFICATION, IGNORE, Example, batches, count_batches, prepare, task_of
from .errors import TrainingError
from .strategies import DomainAdaptation, Strategy, attached

CHECKPOINT, BEST = "checkpoint", "best"


@dataclass(frozen=True)
class FitOptions:
    """How `fit` trains. Pass one as `options=`, or any of its fields as keywords of `fit`."""

    epochs: int = 3
    batch_size: int = 8
    lr: float | None = None  # None: the strategy's default_lr (FullFineTuning: scratch_lr / ratio)
    warmup: float = 0.1  # the fraction of steps with linear warm-up; then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    seed: int = 0  # data order, initialisation and sampling: a resumed run repeats an unbroken one
    output_dir: str | Path | None = None  # the best result in output_dir/best, the state in output_dir/checkpoint
    resume: bool = True  # continue from output_dir/checkpoint when there is one
    checkpoints: bool = True  # False: only the best result is written (full fine-tuning's state is large)
    checkpoint_every: int | None = None  # also save the state every this many steps
    max_length: int | None = None  # longest example in tokens (default: the backbone's context)
    truncate: bool = False  # cut longer examples instead of refusing them
    chat: bool = False  # prompts through the tokenizer's chat template
    progress: bool = True  # the tqdm bar
    callbacks: Sequence[Callable[[dict], None]] = ()  # each gets {"phase", "epoch", "step", "loss", "lr"} per step


@dataclass
class FitResult:
    history: list[dict]  # per epoch: phase, epoch, train_loss, eval_loss, eval_accuracy, seconds, examples_per_s
    best: dict | None  # the history entry whose result is in output_dir/best
    trainable_parameters: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # every step's training loss, in order


@dataclass
class _Phase:
    name: str  # "domain" (language-model training on target-domain text) or "task"
    task: str
    train: list[Example]
    eval: list[Example] | None
    epochs: int


def fit(
    model: torch.nn.Module,
    strategy: Strategy,
    train: Sequence[dict],
    *,
    tokenizer,
    eval: Sequence[dict] | None = None,
    options: FitOptions | None = None,
    **settings,
) -> FitResult:
    """Trains `model` with `strategy` on `train` (examples: see adapterhub/train/data.py), as
    `options` says, with any FitOptions field given as a keyword overriding it:

        fit(model, AdapterTuning("lora", {"r": 8}), examples, tokenizer=tok, epochs=3, output_dir="runs/x")

    With `output_dir`, the best epoch's result (by eval accuracy for classifiers, else eval loss, else
    train loss) is saved in output_dir/best in the strategy's format, and a run finding
    output_dir/checkpoint resumes from it (unless resume=False). Adapters stay resident in their
    Backbone slots afterwards.
    """
    unknown = sorted(set(settings) - set(FitOptions.__dataclass_fields__))
    if unknown:
        raise TrainingError(
            f"fit: unknown option(s) {unknown}; the options are FitOptions' fields: "
            f"{sorted(FitOptions.__dataclass_fields__)}"
        )
    opts = replace(options or FitOptions(), **settings)
    if opts.epochs < 1 or opts.batch_size < 1:
        raise TrainingError(f"fit needs epochs >= 1 and batch_size >= 1, got {opts.epochs} and {opts.batch_size}")
    task = task_of(model)
    limits = dict(max_length=opts.max_length, truncate=opts.truncate, chat=opts.chat)
    phases = []
    if isinstance(strategy, DomainAdaptation):
        texts = [{"text": t} for t in strategy.texts]
        phases.append(
            _Phase(
                "domain",
                CAUSAL_LM,
                prepare(texts, tokenizer, model, CAUSAL_LM, name="domain text", **limits),
                None,
                strategy.epochs,
            )
        )
    phases.append(
        _Phase(
            "task",
            task,
            prepare(train, tokenizer, model, task, **limits),
            prepare(eval, tokenizer, model, task, name="eval", **limits) if eval is not None else None,
            opts.epochs,
        )
    )
    strategy.check_adapters({e.adapter for phase in phases for e in (*phase.train, *(phase.eval or ()))})
    out = Path(opts.output_dir) if opts.output_dir is not None else None
    saved = load_state(out / CHECKPOINT) if out is not None and opts.resume else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    started, was_training = time.perf_counter(), model.training
    torch.manual_seed(opts.seed)
    with attached(strategy, model), _mode_kept(model, was_training):
        if saved is not None:
            _check_resumable(saved, strategy, out)
        run = _Run(model, strategy, pad_id, opts, out, saved)
        for index, phase in enumerate(phases):
            if saved is not None and index < saved["phase"]:
                continue
            run.phase(index, phase, opts.lr if opts.lr is not None else strategy.default_lr)
        count = strategy.trainable_count()
    return FitResult(run.history, run.best, count, time.perf_counter() - started, run.losses)


class _Run:
    """The state of one fit: history, best result, step losses; resumed from `saved` if given."""

    def __init__(self, model, strategy, pad_id: int, options: FitOptions, out: Path | None, saved: dict | None):
        self.model, self.strategy, self.pad_id, self.options = model, strategy, pad_id, options
        self.batch_size, self.seed = options.batch_size, options.seed
        self.out = out
        self.state_dir = out if options.checkpoints else None
        self.saved = saved
        self.history: list[dict] = saved["history"] if saved else []
        self.best: dict | None = saved["best"] if saved else None
        self.losses: list[float] = saved["losses"] if saved else []
        if saved:
            strategy.load_state(saved["strategy"])

    def phase(self, index: int, phase: _Phase, lr: float) -> None:
        optimizer = torch.optim.AdamW(self.strategy.param_groups(lr), weight_decay=self.options.weight_decay)
        per_epoch = count_batches(phase.train, self.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _warmup_then_decay(per_epoch * phase.epochs, self.options.warmup)
        )
        first_epoch, skip = 0, 0
        saved, self.saved = self.saved, None
        if saved is not None and saved["phase"] == index:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            set_rng_state(saved["rng"])
            first_epoch, skip = saved["epoch"], saved["batch"]
        for epoch in range(first_epoch, phase.epochs):
            self.epoch(index, phase, epoch, skip if epoch == first_epoch else 0, optimizer, scheduler)

    def epoch(self, index: int, phase: _Phase, epoch: int, skip: int, optimizer, scheduler) -> None:
        strategy, model = self.strategy, self.model
        strategy.on_epoch(epoch)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        order = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 1_009 + epoch)  # data order
        total = count_batches(phase.train, self.batch_size)
        bar = tqdm(
            total=total,
            initial=skip,
            desc=f"{phase.name} epoch {epoch + 1}/{phase.epochs}",
            disable=not self.options.progress,
            leave=False,
        )
        started, seen = time.perf_counter(), 0
        first = len(self.losses) - skip  # this epoch's losses: self.losses[first:], also those before a resume
        model.train()
        for batch_index, (inputs, adapters) in enumerate(
            batches(phase.train, self.batch_size, phase.task, self.pad_id, generator=order, skip=skip), skip
        ):
            with strategy.routing(adapters):
                loss = model(**inputs).loss
            step = len(self.losses) + 1
            if not torch.isfinite(loss):
                kept = (
                    f"the last good checkpoint is kept in {self.state_dir / CHECKPOINT}"
                    if self.state_dir
                    else "no checkpoint was kept (no output_dir, or checkpoints=False)"
                )
                raise TrainingError(
                    f"the training loss became {loss.item()} at step {step} ({phase.name} epoch "
                    f"{epoch + 1}, batch {batch_index + 1}); training stopped and {kept}. Lower the "
                    f"learning rate (now {scheduler.get_last_lr()[0]:.3g}) or check the data"
                )
            loss.backward()
            if self.options.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.options.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss.item())
            seen += inputs["input_ids"].size(0)
            bar.set_postfix(loss=f"{self.losses[-1]:.4f}", ex_per_s=f"{seen / (time.perf_counter() - started):.1f}")
            bar.update()
            for callback in self.options.callbacks:
                callback(
                    {
                        "phase": phase.name,
                        "epoch": epoch,
                        "step": step,
                        "loss": self.losses[-1],
                        "lr": scheduler.get_last_lr()[0],
                    }
                )
            every = self.options.checkpoint_every
            if self.state_dir and every and step % every == 0 and batch_index + 1 < total:
                self.checkpoint(index, epoch, batch_index + 1, optimizer, scheduler)
        bar.close()
        seconds = time.perf_counter() - started
        losses = self.losses[first:]
        entry = {
            "phase": phase.name,
            "epoch": epoch + 1,
            "train_loss": sum(losses) / max(len(losses), 1),
            "seconds": seconds,
            "examples_per_s": seen / seconds if seconds else 0.0,
        }
        if phase.eval is not None:
            entry.update(evaluate(model, strategy, phase.eval, phase.task, self.batch_size, self.pad_id))
        self.history.append(entry)
        if self.out and phase.name == "task" and _better(entry, self.best):
            self.best = entry
            with atomic_directory(self.out / BEST) as tmp:
                strategy.save(tmp)
        if self.state_dir:
            self.checkpoint(index, epoch + 1, 0, optimizer, scheduler)

    def checkpoint(self, index: int, epoch: int, batch: int, optimizer, scheduler) -> None:
        state = self.strategy.state()
        save_state(
            self.state_dir / CHECKPOINT,
            {
                "phase": index,
                "epoch": epoch,
                "batch": batch,
                "strategy": state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "history": self.history,
                "best": self.best,
                "losses": self.losses,
                "kind": type(self.strategy).__name__,
                "trainable": sorted(state),
            },
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, strategy: Strategy, examples: list[Example], task: str, batch_size: int, pad_id: int
) -> dict:
    """{"eval_loss", "eval_accuracy"}: mean loss and accuracy over `examples` (classes for classifiers,
    next tokens of the labelled positions for language models)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, adapters in batches(examples, batch_size, task, pad_id, generator=None):
        with strategy.routing(adapters):
            out = model(**inputs)
        labels = inputs["labels"]
        if task == CLASSIFICATION:
            n = labels.numel()
            hits = (out.logits.argmax(-1) == labels).sum().item()
        else:
            targets = labels[:, 1:]
            n = int((targets != IGNORE).sum())
            hits = ((out.logits[:, :-1].argmax(-1) == targets) & (targets != IGNORE)).sum().item()
        loss_sum += out.loss.item() * n
        correct, count = correct + hits, count + n
    model.train(was_training)
    return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": correct / max(count, 1)}


@contextlib.contextmanager
def _mode_kept(model: torch.nn.Module, training: bool) -> Iterator[None]:
    """The model back in the train/eval mode it came in (fit switches it to train for its epochs)."""
    try:
        yield
    finally:
        model.train(training)


def _better(entry: dict, best: dict | None) -> bool:
    def key(e: dict) -> tuple:
        if "eval_accuracy" in e:
            return (e["eval_accuracy"], -e["eval_loss"])
        return (-e["train_loss"],)

    return best is None or key(entry) > key(best)


def _warmup_then_decay(total: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up over the first `warmup` fraction of `total` steps, then linear decay to 0."""
    warm = max(1, math.ceil(total * warmup)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def _check_resumable(saved: dict, strategy: Strategy, out: Path) -> None:
    if saved.get("kind") != type(strategy).__name__ or saved.get("trainable") != sorted(strategy.state()):
        raise TrainingError(
            f"{out / CHECKPOINT} holds a {saved.get('kind')} run with other trainable tensors than "
            f"this {type(strategy).__name__}; use another output_dir, or resume=False to start over"
        )
