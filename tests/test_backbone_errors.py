"""Bad adapters and bad calls: a clear error naming the culprit, and the running system unchanged."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import LLAMA_TARGETS, broken_copy, ids, save_peft_adapter, tiny_llama

import adapterhub as ah

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return [
        save_peft_adapter(tiny_llama, root / f"g{seed}", seed=seed, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
        for seed in (1, 2)
    ]


@pytest.fixture
def serving(good):
    """A backbone serving two adapters, and a check that it still serves them exactly as before."""
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=4, max_rank=8)
    names = [bb.load(d, name=d.name) for d in good]
    batch = ids(batch=2)

    def outputs():
        with bb.use(names), torch.no_grad():
            return model(batch).logits

    before = outputs()

    def unchanged():
        assert bb.names == names
        assert torch.equal(outputs(), before)

    return bb, unchanged


def first_key(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


def test_unknown_peft_type(serving, good, tmp_path):
    bb, unchanged = serving
    bad = broken_copy(good[0], tmp_path / "bad", config=lambda c: c.update(peft_type="NOT_A_TYPE"))
    with pytest.raises(ah.AdapterError, match="NOT_A_TYPE"):
        bb.load(bad, name="bad")
    unchanged()


def test_module_missing_from_backbone(serving, good, tmp_path):
    bb, unchanged = serving

    def rename(t):
        for part in ("lora_A", "lora_B"):
            key = first_key(t, f"q_proj.{part}")
            t[key.replace("q_proj", "qq_proj")] = t.pop(key)

    bad = broken_copy(
        good[0],
        tmp_path / "bad",
        tensors=rename,
        config=lambda c: c.update(target_modules=list(c["target_modules"]) + ["qq_proj"]),
    )
    with pytest.raises(ah.AdapterError, match=r"qq_proj.*does not exist"):
        bb.load(bad, name="bad")
    unchanged()


def test_rank_above_max_rank(serving, tmp_path):
    bb, unchanged = serving
    big = save_peft_adapter(tiny_llama, tmp_path / "big", seed=3, r=16, lora_alpha=16, target_modules=["q_proj"])
    with pytest.raises(ah.AdapterError, match="rank 16 > max_rank 8"):
        bb.load(big, name="big")
    unchanged()


def test_shape_mismatch_names_the_tensor(serving, good, tmp_path):
    bb, unchanged = serving

    def widen(t):
        key = first_key(t, "layers.1.mlp.up_proj.lora_B")
        t[key] = torch.randn(t[key].size(0) + 1, t[key].size(1))

    bad = broken_copy(good[0], tmp_path / "bad", tensors=widen)
    with pytest.raises(ah.AdapterError, match=r"up_proj.*\(65, 8\).*\(64, 8\)"):
        bb.load(bad, name="bad")
    unchanged()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(serving, good, tmp_path, value):
    bb, unchanged = serving

    def poison(t):
        t[first_key(t, "v_proj.lora_A")][0, 0] = value

    bad = broken_copy(good[0], tmp_path / "bad", tensors=poison)
    with pytest.raises(ah.AdapterError, match="v_proj"):
        bb.load(bad, name="bad")
    unchanged()


def test_truncated_safetensors(serving, good, tmp_path):
    bb, unchanged = serving
    bad = broken_copy(good[0], tmp_path / "bad")
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ah.AdapterError, match=WEIGHTS):
        bb.load(bad, name="bad")
    unchanged()


def test_name_already_loaded(serving, good):
    bb, unchanged = serving
    with pytest.raises(ah.AdapterError, match=r"already loaded.*swap"):
        bb.load(good[1], name=good[0].name)
    unchanged()


def test_unknown_name(serving):
    bb, unchanged = serving
    for call in (
        lambda: bb.unload("nope"),
        lambda: bb.swap("nope", "."),
        lambda: bb.info("nope"),
        lambda: bb.use("nope").__enter__(),
    ):
        with pytest.raises(ah.AdapterError, match="no adapter named 'nope'"):
            call()
    unchanged()


def test_path_escaping_its_directory(serving, good):
    bb, unchanged = serving
    with pytest.raises(ah.AdapterError, match="escapes"):
        bb.load(good[0], name="esc", subfolder="../g2")
    unchanged()


def test_pickle_only_adapter_is_refused(serving, good, tmp_path):
    bb, unchanged = serving
    bad = shutil.copytree(good[0], tmp_path / "bin")
    torch.save(load_file(bad / WEIGHTS), bad / "adapter_model.bin")
    (bad / WEIGHTS).unlink()
    with pytest.raises(ah.AdapterError, match=r"adapter_model\.bin.*allow_pickle"):
        bb.load(bad, name="bin")
    unchanged()
    bb.load(bad, name="bin", allow_pickle=True)
    assert "bin" in bb.names
