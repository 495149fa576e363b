"""adapterhub-vera against PEFT itself: VeRA adapters saved by PEFT (with and without their projections),
served by an adapterhub Backbone (alone, mixed per row with another VeRA, LoRA and base rows, and
combined by "cat" compositions), saved back and loaded by PEFT, created fresh as PEFT creates them,
and refused with a clear AdapterError where the files are wrong (or a composition method is not
"cat"). Uses only adapterhub's public API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import adapterhub as ah
from adapterhub.plugins import registry

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 128, (6, 7), generator=torch.Generator().manual_seed(0))
# "a": every linear, r=8. "b": r=4, another key, one layer only. "noproj": saved without its projections,
# which PEFT (and the plugin) regenerate from projection_prng_key. Each has different max in/out sizes.
# "c": other layers, but a's key, r and max in/out sizes: PEFT holds VeRA adapters together only so.
CONFIGS = {
    "a": dict(r=8, target_modules=TARGETS),
    "c": dict(r=8, target_modules=["k_proj", "up_proj", "down_proj"], layers_to_transform=[0]),
    "b": dict(r=4, target_modules=["v_proj", "down_proj"], layers_to_transform=[1], projection_prng_key=7),
    "noproj": dict(r=8, target_modules=["q_proj", "v_proj", "gate_proj"], projection_prng_key=3, save_projection=False),
}
# PEFT warns about save_projection=False and GPT-2's fan_in_fan_out, as expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*(vera_A|fan_in_fan_out|PRNG|is_gradient_checkpointing).*")
max_diff: dict[str, float] = {}  # what each comparison with PEFT found, printed at the end (pytest -s)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def save_peft(directory: Path, config, seed: int, build=tiny_llama) -> Path:
    """A PEFT adapter with every trainable tensor random: PEFT starts lambda_b at zero (an identity)."""
    model = get_peft_model(build(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(directory)
    return directory


def peft_out(directory: Path, build=tiny_llama, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(build(), directory).eval()(ids).logits


def compare(key: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    max_diff[key] = float((got - expected).abs().max())
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def broken_copy(src: Path, dst: Path, *, tensors=None, config=None) -> Path:
    """A copy of src with its tensors dict and/or config dict changed in place by the given functions."""
    shutil.copytree(src, dst)
    if tensors:
        state = load_file(dst / "adapter_model.safetensors")
        tensors(state)
        save_file(state, dst / "adapter_model.safetensors")
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    found = {name: save_peft(root / name, VeraConfig(**kw), seed=i) for i, (name, kw) in enumerate(CONFIGS.items())}
    found["lora"] = save_peft(root / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 9)
    return found


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nmax |adapterhub - PEFT|:", {k: f"{v:.2e}" for k, v in sorted(max_diff.items())})


def test_registry_lists_vera_from_its_distribution():
    rows = {row.name: row for row in registry().listing()}
    assert rows["vera"].distribution == "adapterhub-vera" and rows["vera"].version == "0.1.0"
    assert rows["vera"].aliases == ("VERA",) and "adapter_types" in rows["vera"].hooks


def test_peft_files_hold_the_layout_the_plugin_reads(dirs):
    """Guards format.py against PEFT changing its keys: shared projections at base_model.vera_A / vera_B."""
    keys = load_file(dirs["a"] / "adapter_model.safetensors")
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(keys)
    assert "base_model.model.model.layers.0.mlp.down_proj.vera_lambda_b" in keys
    assert not any("vera_A" in k for k in load_file(dirs["noproj"] / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", CONFIGS)
def test_alone_equals_peft(dirs, name):
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=8)
    bb.load(dirs[name], name=name)
    with torch.no_grad(), bb.use(name):
        got = bb.model(IDS).logits
    with torch.no_grad():
        base = tiny_llama()(IDS).logits
    assert (got - base).abs().max() > 1e-2  # the adapter changes the outputs: the comparison means something
    compare(f"llama {name}", got, peft_out(dirs[name]))


def test_mixed_batch_rows_equal_each_alone(dirs):
    """Two VeRA adapters, one regenerated from its key, a LoRA and base rows: each row equals PEFT alone."""
    bb = ah.Backbone(tiny_llama(), max_adapters=4, max_rank=8)
    for name in ("a", "b", "noproj", "lora"):
        bb.load(dirs[name], name=name)
    names = ["a", None, "b", "lora", "noproj", "a"]
    with torch.no_grad(), bb.use(names):
        got = bb.model(IDS).logits
    with torch.no_grad():
        alone = {None: tiny_llama()(IDS).logits, **{n: peft_out(dirs[n]) for n in ("a", "b", "noproj", "lora")}}
    compare("llama mixed batch", got, torch.stack([alone[n][i] for i, n in enumerate(names)]))


@pytest.mark.parametrize("name", ["a", "noproj"])
def test_save_loads_back_in_peft(dirs, tmp_path, name):
    """bb.save writes PEFT's format with the projections (save_projection=True), the same tensors PEFT uses."""
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=8)
    bb.load(dirs[name], name=name)
    bb.save(name, tmp_path / name)
    assert json.loads((tmp_path / name / "adapter_config.json").read_text())["save_projection"] is True
    saved = load_file(tmp_path / name / "adapter_model.safetensors")
    peft = PeftModel.from_pretrained(tiny_llama(), dirs[name]).eval()
    # PEFT's own projections (regenerated by PEFT for "noproj"), bit for bit.
    assert torch.equal(saved["base_model.vera_A"], peft.base_model.vera_A["default"])
    assert torch.equal(saved["base_model.vera_B"], peft.base_model.vera_B["default"])
    compare(f"llama {name} saved by adapterhub", peft_out(tmp_path / name), peft_out(dirs[name]))


def test_evicted_adapter_comes_back_from_the_host_cache(dirs, monkeypatch):
    """Eviction reads the slots (lambdas and the shared projections) into the host cache; reloading writes them back."""
    bb = ah.Backbone(tiny_llama(), max_adapters=1, max_rank=8)
    bb.load(dirs["noproj"], name="noproj")
    bb.load(dirs["b"], name="b")  # evicts "noproj"
    assert bb.evictions == 1 and len(bb.host_cache) == 1
    bb.unload("b")

    def read_again(self, directory, **kwargs):
        raise AssertionError(f"{directory} was read again instead of taken from the host cache")

    monkeypatch.setattr(type(registry().get("vera")), "read", read_again)
    bb.load(dirs["noproj"], name="noproj")
    assert len(bb.host_cache) == 0  # taken out: it lives in a slot again
    with torch.no_grad(), bb.use("noproj"):
        got = bb.model(IDS).logits
    compare("llama noproj evicted and reloaded", got, peft_out(dirs["noproj"]))


def test_gpt2_conv1d_equals_peft(tmp_path):
    directory = save_peft(
        tmp_path / "gpt2", VeraConfig(r=8, target_modules=["c_attn", "c_fc", "c_proj"]), 3, build=tiny_gpt2
    )
    bb = ah.Backbone(tiny_gpt2(), max_adapters=2, max_rank=8)
    bb.load(directory, name="g")
    with torch.no_grad(), bb.use(["g", None]):
        got = bb.model(IDS[:2]).logits
    with torch.no_grad():
        expected = torch.stack([peft_out(directory, tiny_gpt2, IDS[:2])[0], tiny_gpt2()(IDS[:2]).logits[1]])
    compare("gpt2 conv1d", got, expected)


def test_bert_with_modules_to_save_equals_peft(tmp_path):
    config = VeraConfig(r=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
    directory = save_peft(tmp_path / "bert", config, 4, build=tiny_bert)
    bb = ah.Backbone(tiny_bert(), max_adapters=2, max_rank=8)
    assert list(registry().get("vera").read(directory).modules_to_save) == ["classifier"]
    bb.load(directory, name="cls")
    with torch.no_grad(), bb.use("cls"):
        got = bb.model(IDS).logits
    compare("bert + classifier head", got, peft_out(directory, tiny_bert))


def test_init_is_peft_init(tmp_path):
    """init draws PEFT's projections bit for bit and its lambdas; written, PEFT loads it."""
    config = dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=5)
    adapter = registry().get("vera").init(tiny_llama(), config)
    peft = get_peft_model(tiny_llama(), VeraConfig(**config))
    assert torch.equal(next(iter(adapter.modules.values()))["vera_A"], peft.base_model.vera_A["default"])
    assert torch.equal(next(iter(adapter.modules.values()))["vera_B"], peft.base_model.vera_B["default"])
    layers = {
        name.removeprefix("base_model.model."): m for name, m in peft.named_modules() if hasattr(m, "vera_lambda_b")
    }
    assert sorted(layers) == sorted(adapter.modules)
    for path, layer in layers.items():
        assert torch.equal(adapter.modules[path]["vera_lambda_b"], layer.vera_lambda_b["default"].detach())
        assert torch.equal(adapter.modules[path]["vera_lambda_d"], layer.vera_lambda_d["default"].detach())
    g = torch.Generator().manual_seed(6)
    for tensors in adapter.modules.values():  # trained: random lambdas, so that loading it means something
        for key in ("vera_lambda_b", "vera_lambda_d"):
            tensors[key] = torch.randn(tensors[key].shape, generator=g)
    registry().get("vera").write(adapter, tmp_path / "fresh")
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=8)
    bb.load(tmp_path / "fresh", name="fresh")
    with torch.no_grad(), bb.use("fresh"):
        got = bb.model(IDS).logits
    compare("llama init + write", got, peft_out(tmp_path / "fresh"))


def narrow(vera_A: torch.Tensor) -> torch.Tensor:
    """vera_A made for a model half as wide (16 of its 64 columns)."""
    return vera_A[:, :16].contiguous()


LAYER0_Q = "base_model.model.model.layers.0.self_attn.q_proj"
BROKEN = {
    "projection missing": (dict(tensors=lambda t: t.pop("base_model.vera_B")), "save_projection is true"),
    "r disagrees": (dict(config=lambda c: c.update(r=6)), "gives r=6"),
    "lambda missing": (dict(tensors=lambda t: t.pop(f"{LAYER0_Q}.vera_lambda_d")), "not \\['vera_lambda_d'\\]"),
    "nan": (dict(tensors=lambda t: t[f"{LAYER0_Q}.vera_lambda_b"].fill_(float("nan"))), "NaN/inf"),
    "narrow projection": (
        dict(tensors=lambda t: t.update({"base_model.vera_A": narrow(t["base_model.vera_A"])})),
        "need at least \\(8, 64\\)",
    ),
    "bias": (dict(config=lambda c: c.update(bias="all")), "bias='all' trains the backbone's own biases"),
    "unknown key": (dict(tensors=lambda t: t.update(stray=torch.zeros(1))), "unexpected key\\(s\\) stray; expected"),
    "not targeted": (dict(config=lambda c: c.update(target_modules=["k_proj"])), "do not select it"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_bad_files_are_refused_with_the_fix(dirs, tmp_path, case):
    changes, message = BROKEN[case]
    directory = broken_copy(dirs["a"], tmp_path / "broken", **changes)
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=8)
    with pytest.raises(ah.AdapterError, match=message):
        bb.load(directory, name="x")
    assert bb.names == []


def test_rank_above_max_rank_is_refused(dirs):
    with pytest.raises(ah.AdapterError, match="rank 8 > max_rank 4"):
        ah.Backbone(tiny_llama(), max_adapters=2, max_rank=4).load(dirs["a"], name="a")


def test_unchecked_adapter_without_projections_cannot_be_written(dirs, tmp_path):
    """A save_projection=False file gets its projections from the model; read alone, it has none to write."""
    vera = registry().get("vera")
    adapter = vera.read(dirs["noproj"])
    with pytest.raises(ah.AdapterError, match="regenerated from projection_prng_key for a model"):
        vera.write(adapter, tmp_path / "out")
    vera.check(adapter, tiny_llama())
    vera.write(adapter, tmp_path / "out")
    compare("llama noproj checked + written", peft_out(tmp_path / "out"), peft_out(dirs["noproj"]))


def peft_active(directories: dict[str, Path]) -> torch.Tensor:
    """PEFT with every adapter of `directories` active at once: its VeRA layers add each active adapter's delta."""
    names = list(directories)
    model = PeftModel.from_pretrained(tiny_llama(), directories[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(directories[name], adapter_name=name)
    model.base_model.set_adapter(names)
    with torch.no_grad():
        return model.eval()(IDS).logits


def scaled_copy(src: Path, dst: Path, weight: float) -> Path:
    """A copy of src whose every lambda_b is multiplied by weight: VeRA's delta is linear in lambda_b."""
    return broken_copy(
        src, dst, tensors=lambda t: t.update({k: v * weight for k, v in t.items() if k.endswith(".vera_lambda_b")})
    )


def blend(weights, method="cat", names=("a", "c"), **options) -> dict:
    return {"adapters": [{"name": n, "weight": w} for n, w in zip(names, weights)], "method": method, **options}


def cat_backbone(dirs) -> ah.Backbone:
    bb = ah.Backbone(tiny_llama(), max_adapters=4, max_rank=8)
    for name in ("a", "c", "b"):
        bb.load(dirs[name], name=name)
    return bb


def test_cat_equals_peft_with_both_adapters_active(dirs):
    """cat with weights (1, 1) adds both deltas in every layer, as PEFT does with both adapters active."""
    bb = cat_backbone(dirs)
    with torch.no_grad(), bb.use(blend([1.0, 1.0])):
        got = bb.model(IDS).logits
    expected = peft_active({"a": dirs["a"], "c": dirs["c"]})
    for name in ("a", "c"):  # both adapters count: the sum is neither of them alone
        assert (expected - peft_out(dirs[name])).abs().max() > 1e-2
    compare("llama cat (1, 1)", got, expected)
    with torch.no_grad(), bb.use({"adapters": {"a": 1.0, "c": 1.0}}):  # "cat" is VeRA's default method
        compare("llama cat by default", bb.model(IDS).logits, expected)
    assert bb.names == ["a", "c", "b"]  # cat merges nothing into a slot of its own


def test_cat_weights_scale_each_adapters_delta(dirs, tmp_path):
    """cat (0.6, -0.3) equals PEFT with both active, each copy's lambda_b multiplied by its weight."""
    bb = cat_backbone(dirs)
    with torch.no_grad(), bb.use(blend([0.6, -0.3])):
        got = bb.model(IDS).logits
    expected = peft_active(
        {"a": scaled_copy(dirs["a"], tmp_path / "a", 0.6), "c": scaled_copy(dirs["c"], tmp_path / "c", -0.3)}
    )
    assert (expected - peft_active({"a": dirs["a"], "c": dirs["c"]})).abs().max() > 1e-2  # the weights count
    compare("llama cat (0.6, -0.3)", got, expected)


def test_cat_rows_mixed_with_single_and_base_rows_equal_each_alone(dirs):
    bb = cat_backbone(dirs)
    rows = [blend([0.6, -0.3]), "b", None, blend([0.5, 1.5], names=("c", "a"))]
    with torch.no_grad(), bb.use(rows):
        got = bb.model(IDS[:4]).logits
    alone = []
    for i, row in enumerate(rows):
        with torch.no_grad(), bb.use(row):
            alone.append(bb.model(IDS[i : i + 1]).logits[0])
    compare("llama cat rows mixed", got, torch.stack(alone))
    compare("llama base row next to cat rows", got[2], tiny_llama()(IDS[2:3]).logits[0].detach())
    with torch.no_grad(), bb.use(rows, lengths=[IDS.size(1)] * 4):  # the server's packed steps: per token
        packed = bb.model(IDS[:4].reshape(1, -1)).logits
    compare("llama cat rows packed", packed[0, : IDS.size(1)], alone[0])  # the first sequence sees itself only


@pytest.mark.parametrize(("method", "options"), [("linear", {}), ("svd", {}), ("ties", {"density": 0.5})])
def test_methods_other_than_cat_are_refused_by_name(dirs, method, options):
    """PEFT defines no add_weighted_adapter for VeRA: only "cat", which the registry lists too."""
    assert registry().get("vera").composition_methods() == ("cat",)
    assert next(r for r in registry().listing() if r.name == "vera").composition_methods == ("cat",)
    bb = cat_backbone(dirs)
    refused = f"vera adapters compose by \\['cat'\\], not by \"{method}\""
    with pytest.raises(ah.AdapterError, match=refused), torch.no_grad(), bb.use(blend([0.6, 0.4], method, **options)):
        bb.model(IDS)
    assert bb.names == ["a", "c", "b"]  # nothing was materialized
    with torch.no_grad(), bb.use("a"):  # the refused routing did not linger
        compare("llama a after a refused composition", bb.model(IDS).logits, peft_out(dirs["a"]))
