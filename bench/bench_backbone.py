"""The Backbone on SmolLM2-135M (the embedded default), side by side with PEFT (issue 3).

LoRA r=16 on all 7 projections, fp32, CPU. Same run, same inputs:
  prefill   8 x 64 tokens with one adapter
  decode    one step of 32 rows (KV cache of 16 tokens) with 32 distinct adapters
  load      load + unload one adapter from a local directory with 32 resident
            (PEFT: load_adapter + delete_adapter), and ours from the host cache
Ratios are against the base forward of the same model in the same run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterhub as ah
from adapterhub.backbone.host_cache import source_key
from adapterhub.formats import read_peft_lora
from bench.tables import layout, record

RANK, RESIDENT = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base model, our Backbone on a copy, PEFT model on another copy, adapter dirs)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from adapterhub.default_model import load_default

    base, _ = load_default()
    root = tmp_path_factory.mktemp("smollm2-adapters")
    template = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS))
    template.save_pretrained(root / "template")
    shapes = {k: v.shape for k, v in load_file(root / "template" / "adapter_model.safetensors").items()}
    dirs = []
    for i in range(RESIDENT + 1):
        g = torch.Generator().manual_seed(i)
        d = root / f"a{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text((root / "template" / "adapter_config.json").read_text())
        save_file(
            {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()},
            d / "adapter_model.safetensors",
            metadata={"format": "pt"},
        )
        dirs.append(d)
    ours_model = copy.deepcopy(base)
    bb = ah.Backbone(ours_model, max_adapters=RESIDENT + 1, max_rank=RANK, target_modules=TARGETS)
    for i, d in enumerate(dirs[:RESIDENT]):
        bb.load(d, name=f"a{i}")
    peft = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="a0").eval()
    for i, d in enumerate(dirs[1:RESIDENT], start=1):
        peft.load_adapter(d, adapter_name=f"a{i}")
    return base, ours_model, bb, peft, dirs


def prefill_ids():
    return torch.randint(0, 49152, (8, 64), generator=torch.Generator().manual_seed(0))


def decode_inputs(model):
    """One new token for 32 rows on a KV cache of 16 tokens; the cache is cropped back after each step."""
    prompt = torch.randint(0, 49152, (32, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    step = torch.randint(0, 49152, (32, 1), generator=torch.Generator().manual_seed(2))
    return step, cache


def run_step(model, step, cache, **kw):
    with torch.no_grad():
        out = model(step, past_key_values=cache, use_cache=True, **kw).logits
    cache.crop(-1)  # drop the token just appended
    return out


@pytest.mark.parametrize("column", ["base", "ours", "peft"])
def bench_prefill_one_adapter(benchmark, setup, column):
    base, ours_model, bb, peft, _ = setup
    ids = prefill_ids()
    if column == "base":
        fn = lambda: base(ids).logits  # noqa: E731
    elif column == "ours":

        def fn():
            with bb.use("a0"):
                return ours_model(ids).logits
    else:
        peft.set_adapter("a0")
        fn = lambda: peft(ids).logits  # noqa: E731
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=8, warmup_rounds=1, iterations=1)
    record("backbone_smollm2", "prefill 8x64, 1 adapter", column, benchmark)


@pytest.mark.parametrize("column", ["base", "ours", "peft"])
def bench_decode_32_distinct(benchmark, setup, column):
    base, ours_model, bb, peft, _ = setup
    names = [f"a{i}" for i in range(RESIDENT)]
    if column == "base":
        step, cache = decode_inputs(base)
        fn = lambda: run_step(base, step, cache)  # noqa: E731
    elif column == "ours":
        step, cache = decode_inputs(base)

        def fn():
            with bb.use(names):
                return run_step(ours_model, step, cache)
    else:
        step, cache = decode_inputs(base)
        fn = lambda: run_step(peft, step, cache, adapter_names=names)  # noqa: E731
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2, iterations=1)
    record("backbone_smollm2", "decode 32 rows, 32 adapters", column, benchmark)


@pytest.mark.parametrize("column", ["ours", "ours_host_cache", "peft"])
def bench_load_with_32_resident(benchmark, setup, column):
    """Load (and activate) one more adapter while 32 are resident; the previous round's copy is removed untimed."""
    _, _, bb, peft, dirs = setup
    new, key = dirs[RESIDENT], source_key(dirs[RESIDENT])
    if column == "peft":

        def reset():
            if "new" in peft.peft_config:
                peft.set_adapter("a0")
                peft.delete_adapter("new")

        def fn():
            peft.load_adapter(new, adapter_name="new")
            peft.set_adapter("new")
    else:
        cached = read_peft_lora(new)

        def reset():
            if "new" in bb.names:
                bb.unload("new")
            bb.host_cache.take(key)
            if column == "ours_host_cache":
                bb.host_cache.put(key, cached)

        def fn():
            bb.load(new, name="new")

    benchmark.pedantic(fn, setup=reset, rounds=8, warmup_rounds=1, iterations=1)
    reset()
    record("backbone_smollm2", "load one adapter, 32 resident", "peft" if column == "peft" else column, benchmark)


def bench_load_with_1_resident(benchmark, setup):
    """The same load with one adapter resident instead of 32: the cost must not depend on how many are."""
    _, _, bb, _, dirs = setup
    others = [f"a{i}" for i in range(1, RESIDENT)]
    for name in others:
        bb.unload(name)

    def reset():
        if "new" in bb.names:
            bb.unload("new")

    try:
        benchmark.pedantic(
            lambda: bb.load(dirs[RESIDENT], name="new"), setup=reset, rounds=8, warmup_rounds=1, iterations=1
        )
    finally:
        reset()
        for i, name in enumerate(others, start=1):
            bb.load(dirs[i], name=name)
    record("backbone_smollm2", "load one adapter, 1 resident", "ours", benchmark)


@layout("backbone_smollm2")
def backbone_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "| case (SmolLM2-135M, LoRA r=16 x 7 projections, fp32) | base ms | ours ms | PEFT ms "
        "| ours / base | PEFT / base | PEFT / ours |",
        "|---|---|---|---|---|---|---|",
    ]

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    def fmt(v):
        return f"{v:.1f}" if v else "-"

    for case, m in rows.items():
        base = m.get("base")
        ours = m.get("ours")
        peft = m.get("peft")
        lines.append(
            f"| {case} | {fmt(base)} | {fmt(ours)} | {fmt(peft)} | {ratio(ours, base)} "
            f"| {ratio(peft, base)} | {ratio(peft, ours)} |"
        )
        if "ours_host_cache" in m:
            lines.append(f"| {case}, ours from the host cache | - | {m['ours_host_cache']:.1f} | - | - | - | - |")
    return "\n".join(lines)
