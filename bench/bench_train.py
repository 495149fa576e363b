"""Training LoRA in Backbone slots vs PEFT on SmolLM2-135M (the embedded default).

LoRA r=16 on all 7 projections, fp32, CPU; one step = forward + backward + AdamW step on a
causal-LM batch of 8 x 64 tokens. Same run, same inputs:
  one adapter     ours: trained in its slot       PEFT: get_peft_model
  4 adapters      ours: one batch, 2 rows each    PEFT: one adapter per batch (set_adapter), 4 batches of 2 rows
"""

from __future__ import annotations

import copy

import pytest
import torch

import adapterhub as ah
from bench.tables import layout, record

RANK, ADAPTERS = 16, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = {"r": RANK, "lora_alpha": 32, "target_modules": TARGETS}


@pytest.fixture(scope="module")
def models():
    from peft import LoraConfig, get_peft_model

    from adapterhub.default_model import load_default

    base, _ = load_default()
    ours = copy.deepcopy(base).train()
    bb = ah.Backbone(ours, max_adapters=ADAPTERS, max_rank=RANK, target_modules=TARGETS)
    names = [f"a{i}" for i in range(ADAPTERS)]
    for name in names:
        bb.create(name, "lora", CONFIG)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(**CONFIG), adapter_name=names[0]).train()
    for name in names[1:]:
        peft.add_adapter(name, LoraConfig(**CONFIG))
    return ours, bb, peft, names


def batch():
    return torch.randint(0, 49152, (8, 64), generator=torch.Generator().manual_seed(0))


def _step(model, ids, optimizer):
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("column", ["ours", "peft"])
def bench_train_one_adapter(benchmark, models, column):
    ours, bb, peft, names = models
    ids = batch()
    if column == "ours":
        with bb.training(names[0]) as trainable:
            optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-4)

            def fn():
                with bb.use(names[0]):
                    _step(ours, ids, optimizer)

            benchmark.pedantic(fn, rounds=4, warmup_rounds=1, iterations=1)
    else:
        peft.set_adapter(names[0])
        optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
        benchmark.pedantic(lambda: _step(peft, ids, optimizer), rounds=4, warmup_rounds=1, iterations=1)
    record("train_smollm2", "1 adapter, 8x64", column, benchmark)


@pytest.mark.parametrize("column", ["ours", "peft"])
def bench_train_four_adapters(benchmark, models, column):
    ours, bb, peft, names = models
    ids = batch()
    rows = [name for name in names for _ in range(2)]  # 2 rows per adapter
    if column == "ours":
        with bb.training(names) as trainable:
            optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-4)

            def fn():
                with bb.use(rows):
                    _step(ours, ids, optimizer)

            benchmark.pedantic(fn, rounds=4, warmup_rounds=1, iterations=1)
    else:
        optimizers = {}
        for name in names:
            peft.set_adapter(name)
            optimizers[name] = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)

        def fn():
            for k, name in enumerate(names):
                peft.set_adapter(name)
                _step(peft, ids[2 * k : 2 * k + 2], optimizers[name])

        benchmark.pedantic(fn, rounds=4, warmup_rounds=1, iterations=1)
    record("train_smollm2", f"{ADAPTERS} adapters, 2 rows each", column, benchmark)


@layout("train_smollm2")
def _table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "LoRA r=16 on all 7 projections of SmolLM2-135M, fp32; one training step "
        "(forward + backward + AdamW) on 8 x 64 tokens. Median ms.",
        "",
        "| case | ours | PEFT | ours / PEFT |",
        "|---|---|---|---|",
    ]
    for case, cols in rows.items():
        ours, peft = cols.get("ours"), cols.get("peft")
        ratio = f"{ours / peft:.2f}x" if ours and peft else "-"
        lines.append(f"| {case} | {ours or float('nan'):.0f} | {peft or float('nan'):.0f} | {ratio} |")
    return "\n".join(lines)
