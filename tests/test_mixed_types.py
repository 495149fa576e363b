"""One batch, one adapter per row, of different types: every row gets exactly its own adapter's
effect (each row equals running it alone), on a decoder (tiny Llama) and an encoder (tiny BERT)."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig
from tiny_models import LLAMA_TARGETS, ids, save_peft, tiny_bert_cls, tiny_llama

import adapterhub as ah
from adapterhub.plugins import get_type

BOTTLENECK = ("seq_bn", "double_seq_bn")  # made with the type's init, weights randomised, as adapters saves them

CONFIGS = {
    "llama": (
        tiny_llama,
        {
            "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
            "dora": lambda: LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "down_proj"]),
            "ia3": lambda: IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
            ),
            "prompt5": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
            "prompt2": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        },
    ),
    "bert": (
        tiny_bert_cls,
        {
            "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
            "ia3": lambda: IA3Config(
                task_type="SEQ_CLS", target_modules=["key", "output.dense"], feedforward_modules=["output.dense"]
            ),
            "prompt3": lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
        },
    ),
}


def loaded(arch: str, tmp_path):
    build, configs = CONFIGS[arch]
    model = build()
    bb = ah.Backbone(model, max_adapters=len(configs) + len(BOTTLENECK), max_rank=8)
    for seed, (name, config) in enumerate(configs.items()):
        bb.load(save_peft(build, tmp_path / name, seed, config()), name=name)
    bottleneck, g = get_type("bottleneck"), torch.Generator().manual_seed(7)
    for preset in BOTTLENECK:
        adapter = bottleneck.init(model, {"config": preset})
        for parts in adapter.modules.values():
            for key, tensor in parts.items():
                if "adapter_" in key:
                    tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
        bottleneck.write(adapter, tmp_path / preset)
        bb.load(tmp_path / preset, name=preset)
    return model, bb


def outputs(model, batch):
    with torch.no_grad():
        return model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_each_row_equals_running_it_alone(arch, tmp_path):
    model, bb = loaded(arch, tmp_path)
    names = [*CONFIGS[arch][1], *BOTTLENECK, None]
    rows = names + names[::-1]  # every type twice, in two orders
    batch = ids(batch=len(rows), length=6)
    with bb.use(rows):
        together = outputs(model, batch)
    T = batch.size(1)
    for i, name in enumerate(rows):
        with bb.use(name):
            alone = outputs(model, batch[i : i + 1])[0]
        got = together[i] if together.dim() == 2 else together[i, -T:]  # causal: the tokens are the last T
        want = alone if alone.dim() == 1 else alone[-T:]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"row {i} ({name})")
    base = outputs(model, batch[:1])[0]
    for name in names[:-1]:  # and each adapter really does something
        with bb.use(name):
            alone = outputs(model, batch[:1])[0]
        assert not torch.allclose(alone[-T:] if alone.dim() == 2 else alone, base, atol=1e-3), name


def test_compiled_mixed_batches_do_not_recompile_as_names_change(tmp_path):
    torch._dynamo.reset()
    model, bb = loaded("llama", tmp_path)
    batch = ids(batch=4, length=6)
    compiled = torch.compile(model, fullgraph=True)
    kinds = [["lora", "ia3", None, "seq_bn"], ["ia3", "seq_bn", "lora", None], ["lora", None, "ia3", "seq_bn"]]
    with bb.use(kinds[0]), torch.no_grad():
        compiled(batch)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in kinds:
            with bb.use(rows), torch.no_grad():
                got = compiled(batch).logits
            with bb.use(rows):
                torch.testing.assert_close(got, outputs(model, batch), rtol=1e-4, atol=1e-5)


def test_a_failed_swap_leaves_the_name_usable(tmp_path, monkeypatch):
    from adapterhub.types.ia3 import IA3Type

    model, bb = loaded("llama", tmp_path)
    ia3 = save_peft(tiny_llama, tmp_path / "ia3-new", 9, IA3Config(target_modules=["o_proj"]))

    def out_of_memory(*args, **kw):
        raise torch.OutOfMemoryError("no room for new slots")

    monkeypatch.setattr(IA3Type, "allocate", out_of_memory)  # o_proj has no IA3 slots yet
    batch = ids(batch=1)
    with bb.use("lora"):
        before = outputs(model, batch)
    bb.unload("dora")  # a free slot: the swap writes there, the old weights stay
    with pytest.raises(torch.OutOfMemoryError):
        bb.swap("lora", ia3)
    with bb.use("lora"):
        torch.testing.assert_close(outputs(model, batch), before)
    bb.load(tmp_path / "seq_bn", name="third")  # no free slot now: a swap writes in place
    with pytest.raises(torch.OutOfMemoryError):
        bb.swap("lora", ia3)
    assert "lora" not in bb.names  # its weights were partly overwritten, so the name is gone...
    bb.load(tmp_path / "lora", name="lora")  # ...and can be loaded again
    with bb.use("lora"):
        torch.testing.assert_close(outputs(model, batch), before)


def test_one_name_with_repeat_routes_every_row(tmp_path):
    model, bb = loaded("llama", tmp_path)
    batch = ids(batch=2)
    with bb.use("lora"):
        want = model.generate(
            batch, attention_mask=torch.ones_like(batch), num_beams=2, max_new_tokens=3, do_sample=False
        )
    with bb.use("lora", repeat=2):
        got = model.generate(
            batch, attention_mask=torch.ones_like(batch), num_beams=2, max_new_tokens=3, do_sample=False
        )
    assert torch.equal(got, want)


def test_prompt_rows_and_plain_rows_give_their_own_losses(tmp_path):
    """A mixed batch's per-row losses equal each row's loss alone (no extra first-token term for
    unprompted rows); per-sequence labels (classification) are left as they are."""
    model, bb = loaded("llama", tmp_path)
    batch = ids(batch=2)
    rows = ["prompt5", None]
    with torch.no_grad(), bb.use(rows):
        out = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch)
    with torch.no_grad():
        alone = []
        for i, name in enumerate(rows):
            with bb.use(name):
                alone.append(model(input_ids=batch[i : i + 1], labels=batch[i : i + 1]).loss)
    T = batch.size(1)  # the prompted row predicts all T tokens (the first from its prompt), the plain row T - 1
    torch.testing.assert_close(out.loss, (alone[0] * T + alone[1] * (T - 1)) / (2 * T - 1), rtol=1e-5, atol=1e-5)
    bert, bert_bb = loaded("bert", tmp_path / "bert")
    labels = torch.tensor([0, 2])
    with torch.no_grad(), bert_bb.use(["prompt3", None]):
        assert torch.isfinite(bert(input_ids=batch, labels=labels).loss)
