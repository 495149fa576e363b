"""The strategies inside transformers.Trainer: parameter groups as its optimizer, progressive
unfreezing as a callback, and an adapter trained in its Backbone slot by Trainer's own loop."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_bert_cls, tiny_llama
from transformers import Trainer, TrainingArguments

from adapterhub import train
from adapterhub.train.hf import StrategyCallback, optimizer_for


def _dataset(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 100, (8,), generator=g), "labels": torch.tensor(k % 3)} for k in range(n)]


def _args(tmp_path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )


def test_progressive_unfreezing_in_trainer(tmp_path):
    model = tiny_bert_cls().train()
    strategy = train.ProgressiveUnfreezing(decay=2.6)
    strategy.attach(model)
    groups = train.layer_groups(model)
    start = [[p.detach().clone() for p in g] for g in groups]
    seen = []

    class Record(StrategyCallback):  # what was frozen during each epoch
        def on_epoch_end(self, args, state, control, **kwargs):
            seen.append([all(p.requires_grad for p in g) for g in groups])

    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_dataset(),
        optimizers=(optimizer_for(strategy, lr=1e-2), None),
        callbacks=[Record(strategy)],
    )
    trainer.train()
    assert seen == [[False, False, False, True], [False, False, True, True]]
    changed = [any(not torch.equal(p, q) for p, q in zip(g, s)) for g, s in zip(groups, start)]
    assert changed == [False, False, True, True]
    rates = [group["initial_lr"] for group in trainer.optimizer.param_groups]  # before Trainer's decay
    assert [rates[k + 1] / rates[k] for k in range(3)] == pytest.approx([2.6, 2.6, 2.6])


def test_adapter_trained_in_its_slot_by_trainer(tmp_path):
    model = tiny_llama().train()
    strategy = train.AdapterTuning("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    strategy.attach(model)
    data = [{"input_ids": row["input_ids"], "labels": row["input_ids"]} for row in _dataset()]
    trainer = Trainer(
        model=model, args=_args(tmp_path), train_dataset=data, optimizers=(optimizer_for(strategy, lr=1e-2), None)
    )
    with strategy.routing([None]):
        first = trainer.evaluate(data)["eval_loss"]
        trainer.train()
        last = trainer.evaluate(data)["eval_loss"]
    strategy.detach()
    assert last < first
    assert all(not p.requires_grad for p in model.parameters())  # the backbone stayed frozen
    strategy.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
