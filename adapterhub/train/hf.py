"""The strategies inside transformers.Trainer: their parameter groups as its optimizer, their
per-epoch changes as a callback, and adapters' routing around its training steps.

    strategy = ProgressiveUnfreezing()
    strategy.attach(model)
    trainer = Trainer(model, args, train_dataset=..., optimizers=(optimizer_for(strategy, lr=1e-4), None),
                      callbacks=[StrategyCallback(strategy)])
    with strategy.routing([None]):       # AdapterTuning: every row through its adapter's slot
        trainer.train()
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .strategies import Strategy


def optimizer_for(strategy: Strategy, lr: float | None = None, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the strategy's parameter groups (each with its own learning rate)."""
    return torch.optim.AdamW(
        strategy.param_groups(lr if lr is not None else strategy.default_lr), weight_decay=weight_decay
    )


class StrategyCallback(TrainerCallback):
    """Calls the strategy's `on_epoch` at the start of each Trainer epoch (progressive unfreezing)."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.strategy.on_epoch(round(state.epoch or 0))
