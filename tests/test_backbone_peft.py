"""Adapters PEFT saved give PEFT's outputs through adapterhub, and the reverse."""

import pytest
import torch
from tiny_models import LLAMA_TARGETS, ids, peft_model, save_peft_adapter, tiny_bert_cls, tiny_gpt2, tiny_llama

import adapterhub as ah

VARIANTS = {
    "llama": (tiny_llama, dict(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)),
    "llama-patterns": (
        tiny_llama,
        dict(
            r=8,
            lora_alpha=16,
            target_modules=LLAMA_TARGETS,
            rank_pattern={"layers.1.self_attn.q_proj": 4, "down_proj": 2},
            alpha_pattern={"v_proj": 3},
        ),
    ),
    "llama-rslora": (tiny_llama, dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "llama-dora": (tiny_llama, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])),
    "llama-regex": (tiny_llama, dict(r=4, lora_alpha=4, target_modules=r".*\.(q_proj|up_proj)")),
    "llama-layers": (
        tiny_llama,
        dict(r=4, lora_alpha=4, target_modules=["k_proj", "gate_proj"], layers_to_transform=[1]),
    ),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "bert-cls": (
        tiny_bert_cls,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value", "dense"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        ),
    ),
}


def logits(model, batch):
    with torch.no_grad():
        return model(batch).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return {
        name: [save_peft_adapter(build, root / f"{name}-{seed}", seed=seed, **kw) for seed in (1, 2)]
        for name, (build, kw) in VARIANTS.items()
    }


def backbone_for(build):
    model = build()
    return model, ah.Backbone(model, max_adapters=4, max_rank=16, target_modules=_targets(model))


def _targets(model):
    # BERT's classifier head is a modules_to_save copy, not a LoRA target: adapt every linear layer but it.
    return r"(?!classifier$).*" if type(model).__name__.startswith("Bert") else None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_match_peft(saved, variant):
    build, _ = VARIANTS[variant]
    model, bb = backbone_for(build)
    batch = ids()
    base = logits(model, batch)
    for directory in saved[variant]:
        bb.load(directory, name=directory.name)
        with bb.use(directory.name):
            ours = logits(model, batch)
        expected = logits(peft_model(build, directory), batch)
        assert not torch.allclose(expected, base, atol=1e-3), "the adapter must change the output"
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model, batch), base)  # outside `use`: the base model, untouched


@pytest.mark.parametrize("variant", ["llama", "llama-dora", "gpt2", "bert-cls"])
def test_mixed_batch_matches_per_row_runs(saved, variant):
    build, _ = VARIANTS[variant]
    model, bb = backbone_for(build)
    first, second = (bb.load(d, name=d.name) for d in saved[variant])
    batch = ids(batch=4)
    names = [first, second, None, first]
    with bb.use(names):
        mixed = logits(model, batch)
    for row, name in enumerate(names):
        with bb.use(name):
            single = logits(model, batch[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_adapter_loads_in_peft(saved, variant, tmp_path):
    build, _ = VARIANTS[variant]
    model, bb = backbone_for(build)
    name = bb.load(saved[variant][0], name="mine")
    bb.save(name, tmp_path / "out")
    batch = ids()
    with bb.use(name):
        ours = logits(model, batch)
    torch.testing.assert_close(logits(peft_model(build, tmp_path / "out"), batch), ours, rtol=1e-4, atol=1e-5)
