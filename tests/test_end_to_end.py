"""End to end on the embedded default backbone (SmolLM2-135M-Instruct): PEFT adapters
loaded by Hub repo id from a real local cache, offline, served in one mixed batch."""

import copy

import pytest
import torch
from hub_cache import add_commit, files_of
from tiny_models import LLAMA_TARGETS, save_peft_adapter

import adapterhub as ah


@pytest.fixture(scope="module")
def smollm2():
    from adapterhub.default_model import load_default

    return load_default()


@pytest.fixture(scope="module")
def hub(smollm2, tmp_path_factory):
    """A Hugging Face cache holding two PEFT adapters for SmolLM2: org/support (main) and org/legal (tag v1)."""
    model, _ = smollm2
    root = tmp_path_factory.mktemp("smol")
    cache = root / "cache"
    build = lambda: copy.deepcopy(model)  # noqa: E731
    support = save_peft_adapter(build, root / "support", seed=1, r=16, lora_alpha=32, target_modules=LLAMA_TARGETS)
    legal = save_peft_adapter(
        build,
        root / "legal",
        seed=2,
        r=8,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 4},
    )
    add_commit(cache, "org/support", files_of(support))
    add_commit(cache, "org/legal", files_of(legal), refs=("v1",))
    return cache, {"support": support, "legal": legal}


def serving_offline(model, cache, monkeypatch, **revisions):
    """(a copy of model, its Backbone) with the named org/<name> adapters loaded by repo id, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    served = copy.deepcopy(model)
    bb = ah.Backbone(served, max_adapters=4, max_rank=16, target_modules=LLAMA_TARGETS)
    for name, revision in revisions.items():
        bb.load(f"org/{name}", name=name, revision=revision, cache_dir=cache)
    return served, bb


def test_hub_adapters_offline_match_peft_in_one_mixed_batch(smollm2, hub, monkeypatch):
    from peft import PeftModel

    model, tokenizer = smollm2
    cache, local = hub
    served, bb = serving_offline(model, cache, monkeypatch, support=None, legal="v1")
    prompts = ["How do I reset my password?", "Is this contract binding?", "Hello"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    names = ["support", "legal", None]
    with bb.use(names), torch.no_grad():
        mixed = served(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(mixed[2], model(**batch).logits[2], rtol=1e-4, atol=1e-4)
        for row, name in enumerate(names[:2]):
            peft = PeftModel.from_pretrained(copy.deepcopy(model), local[name]).eval()
            expected = peft(**batch).logits[row]
            # 30 layers of fp32 with different summation orders: compare against the logits' scale
            error = (mixed[row] - expected).abs().max() / expected.abs().max()
            assert error < 1e-4, f"{name}: max error {error:.2e} of the largest logit"


def test_generate_per_row_adapters(smollm2, hub, monkeypatch):
    model, tokenizer = smollm2
    cache, _ = hub
    served, bb = serving_offline(model, cache, monkeypatch, support=None)
    tokenizer.padding_side = "left"
    batch = tokenizer(["Write a haiku", "Write a haiku"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with bb.use(["support", None]), torch.no_grad():
        out = served.generate(**batch, **kw)
    with torch.no_grad():
        base = model.generate(**batch, **kw)
    assert torch.equal(out[1], base[1])
    assert not torch.equal(out[0], base[0])
