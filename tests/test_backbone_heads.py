"""modules_to_save heads (per-adapter classifier copies): per-row, in flight, under torch.compile, bad input."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import ids, save_peft_adapter, tiny_bert_cls

import adapterhub as ah

ALL_BUT_CLASSIFIER = r"(?!classifier$).*"


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return [
        save_peft_adapter(
            tiny_bert_cls,
            root / f"h{seed}",
            seed=seed,
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        )
        for seed in range(1, 7)
    ]


def logits(model, batch):
    with torch.no_grad():
        return model(batch).logits


def test_unload_and_swap_during_a_batch_keep_its_head(heads):
    model = tiny_bert_cls()
    bb = ah.Backbone(model, max_adapters=3, max_rank=4, target_modules=ALL_BUT_CLASSIFIER)
    bb.load(heads[0], name="h")
    batch = ids(batch=2)
    with bb.use("h"):
        before = logits(model, batch)
        bb.swap("h", heads[1])
        assert torch.equal(logits(model, batch), before)
        bb.unload("h")
        assert torch.equal(logits(model, batch), before)


def test_compiled_model_does_not_recompile_as_heads_change(heads):
    torch._dynamo.reset()
    model = tiny_bert_cls()
    bb = ah.Backbone(model, max_adapters=4, max_rank=4, target_modules=ALL_BUT_CLASSIFIER)
    for i in range(3):
        bb.load(heads[i], name=f"h{i}")
    compiled = torch.compile(model, fullgraph=True)
    batch = ids(batch=3)
    with bb.use(["h0", "h1", None]), torch.no_grad():
        compiled(batch)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step, pair in enumerate([(1, 2), (2, 0), (0, 0), (2, 1)] * 3):
            if step == 5:
                bb.swap("h1", heads[4])
            names = [f"h{pair[0]}", f"h{pair[1]}", None]
            with bb.use(names), torch.no_grad():
                got = compiled(batch).logits
                torch.testing.assert_close(got, logits(model, batch), rtol=1e-4, atol=1e-5)


def test_head_copy_with_missing_weight_is_refused_before_anything_changes(heads, tmp_path):
    model = tiny_bert_cls()
    bb = ah.Backbone(model, max_adapters=2, max_rank=4, target_modules=ALL_BUT_CLASSIFIER)
    bb.load(heads[0], name="a")
    bb.load(heads[1], name="b")  # all slots taken: a bad load must not evict anything
    batch = ids(batch=2)
    with bb.use(["a", "b"]):
        before = logits(model, batch)
    bad = shutil.copytree(heads[2], tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    del tensors[next(k for k in tensors if k.endswith("classifier.weight"))]
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ah.AdapterError, match="classifier"):
        bb.load(bad, name="bad")
    assert sorted(bb.names) == ["a", "b"]
    with bb.use(["a", "b"]):
        assert torch.equal(logits(model, batch), before)
