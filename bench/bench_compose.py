"""Compositions on SmolLM2-135M (the embedded default) against PEFT's add_weighted_adapter (issue 18).

    .venv/bin/python -m pytest bench/bench_compose.py -q     (about 3 minutes on 2 CPU cores)

LoRA r=16 on all 7 projections, fp32, CPU; 8 adapters. One decode step of 32 rows (KV cache of 16
tokens), the step repeated and the median taken, for:
- base: no adapter;
- single: each row one adapter (a_i, i = row mod 8);
- cat K=2: each row a "cat" composition of two adapters (a_i x 0.6, a_i+1 x 0.4), on the fly;
- one adapter, every row; and ties: every row one TIES composition (density 0.5), materialized into a slot;
- PEFT single (adapter_names) and PEFT cat: add_weighted_adapter("cat") made one rank-32 adapter
  that every row uses (PEFT cannot mix compositions per row).
Goal: cat's added time over the base <= 2.2x single's. And the time to materialize TIES of two r=16
adapters (a fresh one each round; goal <= 100 ms) against PEFT's add_weighted_adapter("ties").
Results: bench/results/compose_smollm2.{md,json}.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import adapterhub as ah
from bench.tables import machine

RANK, ADAPTERS, ROWS = 16, 8, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).parent / "results"


def make_adapters(base, root: Path, targets: list[str] = TARGETS, count: int = ADAPTERS) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    root.mkdir(parents=True, exist_ok=True)
    template = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=32, target_modules=targets))
    template.save_pretrained(root / "template")
    shapes = {k: v.shape for k, v in load_file(root / "template" / "adapter_model.safetensors").items()}
    dirs = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        d = root / f"a{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text((root / "template" / "adapter_config.json").read_text())
        tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
        dirs.append(d)
    return dirs


def decode_inputs(model):
    prompt = torch.randint(0, 49152, (ROWS, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    return torch.randint(0, 49152, (ROWS, 1), generator=torch.Generator().manual_seed(2)), cache


def median_ms(fn, rounds: int = 15, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def step_fn(model, names=None, bb=None, **kw):
    step, cache = decode_inputs(model)

    def run():
        with torch.no_grad():
            if bb is not None:
                with bb.use(names):
                    model(step, past_key_values=cache, use_cache=True)
            else:
                model(step, past_key_values=cache, use_cache=True, **kw)
        cache.crop(-1)

    return run


def cat(i: int) -> dict:
    return {
        "adapters": [{"name": f"a{i % ADAPTERS}", "weight": 0.6}, {"name": f"a{(i + 1) % ADAPTERS}", "weight": 0.4}],
        "method": "cat",
    }


def ties(weight: float = 0.5) -> dict:
    return {
        "adapters": [{"name": "a0", "weight": weight}, {"name": "a1", "weight": 1 - weight}],
        "method": "ties",
        "density": 0.5,
    }


def bench_compositions(tmp_path):
    from peft import PeftModel

    from adapterhub.default_model import load_default

    torch.manual_seed(0)
    base, _ = load_default()
    base.eval()
    dirs = make_adapters(base, tmp_path)
    ours = copy.deepcopy(base)
    bb = ah.Backbone(ours, max_adapters=ADAPTERS + 4, max_rank=RANK, target_modules=TARGETS)
    for i, d in enumerate(dirs):
        bb.load(d, name=f"a{i}")
    peft = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="a0").eval()
    for i, d in enumerate(dirs[1:], start=1):
        peft.load_adapter(d, adapter_name=f"a{i}")
    peft.add_weighted_adapter(["a0", "a1"], [0.6, 0.4], "cat01", combination_type="cat")

    singles = [f"a{i % ADAPTERS}" for i in range(ROWS)]
    cats = [cat(i) for i in range(ROWS)]
    bb.materialize(ties())
    ms = {
        "base": median_ms(step_fn(base)),
        "single": median_ms(step_fn(ours, singles, bb)),
        "cat K=2": median_ms(step_fn(ours, cats, bb)),
        "one adapter, every row": median_ms(step_fn(ours, ["a0"] * ROWS, bb)),
        "ties (materialized), every row": median_ms(step_fn(ours, [ties()] * ROWS, bb)),
        "PEFT single": median_ms(step_fn(peft, adapter_names=singles)),
        "PEFT cat (materialized, rank 32)": median_ms(step_fn(peft, adapter_names=["cat01"] * ROWS)),
    }
    added = {case: ms[case] - ms["base"] for case in ms if case != "base"}

    weights = iter([0.3 + 0.01 * k for k in range(100)])  # a fresh content key (another weight) each round

    def materialize():
        name = bb.materialize(ties(next(weights)))
        bb.unload(name)

    peft_round = iter(range(100))

    def peft_ties():
        name = f"t{next(peft_round)}"
        peft.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], name, combination_type="ties", density=0.5)
        peft.delete_adapter(name)

    materialize_ms = {
        "ours": median_ms(materialize, rounds=9, warmup=1),
        "PEFT": median_ms(peft_ties, rounds=9, warmup=1),
    }
    qv = materialize_qv(base, tmp_path / "qv")
    results = {
        "machine": machine(),
        "rows": ROWS,
        "rank": RANK,
        "median_step_ms": ms,
        "added_ms_over_base": added,
        "cat_over_single_added": added["cat K=2"] / added["single"],
        "ties_over_one_adapter_added": added["ties (materialized), every row"] / added["one adapter, every row"],
        "materialize_ties_ms": materialize_ms,
        "materialize_ties_qv_ms": qv,
        "backend": ah.backend(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compose_smollm2.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "compose_smollm2.md").write_text(table(results))
    print(table(results))
    assert results["cat_over_single_added"] > 0  # the numbers are reported, not asserted (bench/README.md)


def materialize_qv(base, root: Path) -> dict:
    """The same TIES materialization for adapters on q_proj and v_proj only (PEFT's default targets for
    Llama models), ours and PEFT's."""
    from peft import PeftModel

    dirs = make_adapters(base, root, targets=["q_proj", "v_proj"], count=2)
    bb = ah.Backbone(copy.deepcopy(base), max_adapters=4, max_rank=RANK, target_modules=["q_proj", "v_proj"])
    for i, d in enumerate(dirs):
        bb.load(d, name=f"a{i}")
    weights = iter([0.3 + 0.01 * k for k in range(100)])

    def materialize():
        bb.unload(bb.materialize(ties(next(weights))))

    peft = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="a0").eval()
    peft.load_adapter(dirs[1], adapter_name="a1")
    names = iter(range(100))

    def peft_ties():
        name = f"t{next(names)}"
        peft.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], name, combination_type="ties", density=0.5)
        peft.delete_adapter(name)

    return {"ours": median_ms(materialize, rounds=9, warmup=1), "PEFT": median_ms(peft_ties, rounds=9, warmup=1)}


def table(r: dict) -> str:
    lines = [
        "### compose_smollm2",
        "",
        f"Machine: {r['machine']}. ops backend: {r['backend']}. One decode step, {r['rows']} rows, KV cache of 16 "
        f"tokens, LoRA r={r['rank']} on 7 projections, fp32; median of 15.",
        "",
        "| case | step ms | added over base ms |",
        "|---|---|---|",
        f"| base | {r['median_step_ms']['base']:.2f} | - |",
    ]
    for case, added in r["added_ms_over_base"].items():
        lines.append(f"| {case} | {r['median_step_ms'][case]:.2f} | {added:.2f} |")
    m = r["materialize_ties_ms"]
    lines += [
        "",
        f"cat K=2 added time / single added time: **{r['cat_over_single_added']:.2f}x** (goal <= 2.2x); "
        f"a materialized TIES composition on every row / one adapter on every row: "
        f"{r['ties_over_one_adapter_added']:.2f}x (it is one adapter).",
        "",
        f"Materializing TIES (density 0.5) of two r=16 adapters into a slot: **{m['ours']:.1f} ms** (goal <= 100 ms); "
        f"PEFT add_weighted_adapter('ties') + delete_adapter: {m['PEFT']:.1f} ms ({m['PEFT'] / m['ours']:.1f}x ours).",
        f"The same for adapters on q_proj and v_proj only (PEFT's default Llama targets): "
        f"**{r['materialize_ties_qv_ms']['ours']:.1f} ms**, PEFT {r['materialize_ties_qv_ms']['PEFT']:.1f} ms.",
        "",
    ]
    return "\n".join(lines)
