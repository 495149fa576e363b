"""IA3 and prompt tuning adapters that PEFT saved give PEFT's outputs through the Backbone, and the
ones the Backbone saves load in PEFT with the same outputs. (LoRA: test_backbone_peft.py.)"""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, PromptTuningConfig
from tiny_models import VOCAB, ids, peft_model, save_peft, tiny_bert_cls, tiny_gpt2, tiny_llama
from transformers import LlamaConfig, LlamaForSequenceClassification, RobertaConfig, RobertaForTokenClassification

import adapterhub as ah
from adapterhub.types.prompt_tuning import _reads_last_position


def tiny_roberta_tokens() -> RobertaForTokenClassification:
    """RoBERTa numbers positions from padding_idx + 1: a prompt must not renumber them."""
    torch.manual_seed(0)
    return RobertaForTokenClassification(
        RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=72,
            num_labels=3,
        )
    ).eval()


def tiny_llama_cls() -> LlamaForSequenceClassification:
    """A decoder classifier: it reads the last position, so its rows are padded on the left."""
    torch.manual_seed(0)
    return LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_labels=3,
            pad_token_id=0,
        )
    ).eval()


CASES = {
    "ia3-llama": (
        tiny_llama,
        lambda: IA3Config(
            task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    ),
    "ia3-llama-regex": (
        tiny_llama,
        lambda: IA3Config(target_modules=r".*\.(k_proj|up_proj|gate_proj)", feedforward_modules=r".*\.up_proj"),
    ),
    "ia3-gpt2": (
        tiny_gpt2,
        lambda: IA3Config(
            target_modules=["c_attn", "c_fc", "c_proj"], feedforward_modules=["c_fc"], fan_in_fan_out=True
        ),
    ),
    "ia3-bert-cls": (
        tiny_bert_cls,
        lambda: IA3Config(
            task_type="SEQ_CLS",
            target_modules=["query", "value", "output.dense"],
            feedforward_modules=["output.dense"],
            modules_to_save=["classifier"],
        ),
    ),
    "prompt-llama": (tiny_llama, lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)),
    "prompt-gpt2": (tiny_gpt2, lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "ia3-gpt2-suffix": (
        tiny_gpt2,
        lambda: IA3Config(target_modules=["c_fc", "c_proj", "fc"], feedforward_modules=["fc"], fan_in_fan_out=True),
    ),  # PEFT: "fc" is a plain suffix of c_fc
    "prompt-bert-cls": (tiny_bert_cls, lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)),
    "prompt-roberta-tokens": (
        tiny_roberta_tokens,
        lambda: PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3),
    ),
    "prompt-llama-cls": (tiny_llama_cls, lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
}


def outputs(model, batch, **kw):
    with torch.no_grad():
        return model(input_ids=batch, **kw).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-types")
    return {
        name: [save_peft(build, root / f"{name}-{seed}", seed, config()) for seed in (1, 2)]
        for name, (build, config) in CASES.items()
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_matches_peft_per_row(case, saved):
    build, _ = CASES[case]
    model = build()
    bb = ah.Backbone(model, max_adapters=4, max_rank=8, preallocate=())
    for i, directory in enumerate(saved[case]):
        bb.load(directory, name=f"a{i}")
    assert bb.info("a0").type == case.split("-")[0].replace("prompt", "prompt_tuning")
    batch = ids(batch=3).clamp(min=2)  # no pad id inside a text (RoBERTa would skip it when numbering positions)
    with bb.use(["a0", None, "a1"]):
        ours = outputs(model, batch)
    T = batch.size(1)
    expected = [
        outputs(peft_model(build, saved[case][0]), batch[:1]),
        outputs(build(), batch[1:2]),
        outputs(peft_model(build, saved[case][1]), batch[2:]),
    ]
    for row, want in enumerate(expected):
        # per-token outputs: a row's tokens are the last T (left padding), or follow its own prompt (encoders)
        start = ours.size(1) - T if _reads_last_position(model) else want.size(1) - T
        got = ours[row] if want.dim() == 2 else ours[row, start : start + T]
        want = want[0] if want.dim() == 2 else want[0, -T:]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = outputs(build(), batch[:1])
    changed = expected[0][0] if base.dim() == 2 else expected[0][0, -T:]
    assert not torch.allclose(changed, base[0], atol=1e-3), "the adapter must change the outputs"


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_by_the_backbone_loads_in_peft_with_the_same_outputs(case, saved, tmp_path):
    build, _ = CASES[case]
    model = build()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8, preallocate=())
    bb.load(saved[case][0], name="a")
    bb.save("a", tmp_path)
    batch = ids(batch=2)
    torch.testing.assert_close(
        outputs(peft_model(build, tmp_path), batch), outputs(peft_model(build, saved[case][0]), batch), rtol=0, atol=0
    )


def test_prompt_tuning_generate_matches_full_forward_greedy(saved):
    """Mixed prompt lengths and a base row generate what each row generates alone, step by step
    without a cache through PEFT's forward (PEFT 0.21's own generate() drifts on transformers 5)."""
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8, preallocate=())
    bb.load(saved["prompt-llama"][0], name="p")
    batch = ids(batch=2)
    with torch.no_grad(), bb.use(["p", None]):
        ours = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=6, do_sample=False)

    def greedy(forward, x):
        for _ in range(6):
            x = torch.cat([x, forward(x)[:, -1].argmax(-1, keepdim=True)], 1)
        return x

    reference = peft_model(tiny_llama, saved["prompt-llama"][0])
    base = tiny_llama()
    assert torch.equal(ours[0], greedy(lambda x: outputs(reference, x), batch[:1])[0])
    assert torch.equal(ours[1], greedy(lambda x: outputs(base, x), batch[1:])[0])


def test_prompt_tuning_prefixes_labels_like_peft(saved):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8, preallocate=())
    bb.load(saved["prompt-llama"][0], name="p")
    batch = ids(batch=1)
    with torch.no_grad(), bb.use("p"):
        ours = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
    with torch.no_grad():
        want = peft_model(tiny_llama, saved["prompt-llama"][0])(input_ids=batch, labels=batch).loss
    torch.testing.assert_close(ours, want)
