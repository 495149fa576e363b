"""adapterhub-loha against PEFT itself: LoHa adapters saved by PEFT, served by an adapterhub Backbone
(alone, mixed per row with other adapters and types, and combined by "cat" compositions), saved back
and loaded by PEFT, and refused with a clear AdapterError where the plugin cannot run them (or a
composition method other than "cat"). Uses only adapterhub's public API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import adapterhub as ah
from adapterhub.formats import write_peft
from adapterhub.plugins import registry

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Adapter "a": rank and alpha patterns; "b": a regex target and another rank. "a" needs max_rank >= 4*4.
LOHA_A = dict(
    r=4,
    alpha=8,
    target_modules=TARGETS,
    rank_pattern={"v_proj": 2},
    alpha_pattern={"o_proj": 3, "layers.1.mlp.down_proj": 5.5},
)
LOHA_B = dict(r=3, alpha=5, target_modules=r".*\.(q_proj|up_proj)")
IDS = torch.randint(0, 128, (5, 6), generator=torch.Generator().manual_seed(0))


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


def save_peft(directory: Path, config, seed: int, build=tiny_llama) -> Path:
    """A PEFT adapter with every adapter weight random (PEFT zeroes hada_w2_b / lora_B, an identity)."""
    model = get_peft_model(build(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name or "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(directory)
    return directory


def peft_logits(directory: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(), directory).eval()(ids).logits


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": save_peft(root / "a", LoHaConfig(**LOHA_A), seed=1),
        "b": save_peft(root / "b", LoHaConfig(**LOHA_B), seed=2),
        "lora": save_peft(root / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=3),
    }


@pytest.fixture(scope="module")
def refs(dirs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        base = tiny_llama()(IDS).logits
    return {"base": base, **{name: peft_logits(d) for name, d in dirs.items()}}


def routed(bb: ah.Backbone, names, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad(), bb.use(names):
        return bb.model(ids).logits


def test_each_adapter_matches_peft(dirs, refs):
    bb = ah.Backbone(tiny_llama(), max_adapters=4, max_rank=16)
    for name in ("a", "b"):
        bb.load(dirs[name], name=name)
        assert bb.info(name).type == "loha"  # found by peft_type "LOHA"
        assert bb.info(name).rank == {"a": 16, "b": 9}[name]  # r*r
        got = routed(bb, name)
        assert (refs[name] - refs["base"]).abs().max() > 1e-2  # the adapter changes the outputs
        diff = (got - refs[name]).abs().max().item()
        print(f"loha {name}: max abs diff vs PEFT {diff:.2e}")
        assert diff < ATOL


def test_mixed_batch_rows_equal_each_row_alone(dirs, refs):
    bb = ah.Backbone(tiny_llama(), max_adapters=4, max_rank=16)
    for name, directory in dirs.items():
        bb.load(directory, name=name)
    names = ["a", None, "b", "lora", None]
    mixed = routed(bb, names)
    for i, name in enumerate(names):
        alone = routed(bb, name, IDS[i : i + 1])[0]
        assert (mixed[i] - alone).abs().max() < ATOL
        assert (mixed[i] - refs[name or "base"][i]).abs().max() < ATOL
    assert torch.equal(mixed[1], routed(bb, None)[1])  # the base row passes through exactly


def test_save_loads_in_peft_with_the_same_tensors_and_outputs(dirs, refs, tmp_path):
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=16)
    bb.load(dirs["a"], name="a")
    bb.save("a", tmp_path / "saved")
    original = load_file(dirs["a"] / "adapter_model.safetensors")
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert original.keys() == saved.keys() and all(torch.equal(original[k], saved[k]) for k in original)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    ref = PeftModel.from_pretrained(tiny_llama(), dirs["a"])

    def scales(m):
        return {n: x.scaling["default"] for n, x in m.named_modules() if hasattr(x, "hada_w1_a")}

    assert scales(reloaded) == scales(ref)  # rank and alpha patterns restored exactly
    with torch.no_grad():
        assert (reloaded.eval()(IDS).logits - refs["a"]).abs().max() < ATOL


def test_evicted_adapter_comes_back_from_its_slots(dirs, refs):
    bb = ah.Backbone(tiny_llama(), max_adapters=1, max_rank=16)
    bb.load(dirs["a"], name="a")
    bb.load(dirs["b"], name="b")  # evicts "a": slots.read -> host cache
    assert bb.names == ["b"]
    bb.load(dirs["a"], name="a")  # from the host cache: slots.write of what read gave
    assert (routed(bb, "a") - refs["a"]).abs().max() < ATOL


def test_init_is_peft_init_and_loads_in_peft(tmp_path):
    loha = registry().get("loha")
    config = {"r": 2, "alpha": 4, "target_modules": ["q_proj", "down_proj"]}
    ours, theirs = tiny_llama(), tiny_llama()  # each seeds itself: build both before seeding the inits
    torch.manual_seed(7)
    adapter = loha.init(ours, config)
    torch.manual_seed(7)
    peft_model = get_peft_model(theirs, LoHaConfig(**config))
    peft_state = {n: p for n, p in peft_model.named_parameters() if "hada_" in n}
    for path, tensors in adapter.modules.items():
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            assert torch.equal(tensors[name], peft_state[f"base_model.model.{path}.{name}.default"])
        assert not tensors["hada_w2_b"].any()  # identity at init
    loha.write(adapter, tmp_path / "init")
    with torch.no_grad():
        assert torch.equal(peft_logits(tmp_path / "init"), tiny_llama()(IDS).logits)
    random = loha.init(tiny_llama(), {**config, "init_weights": False})
    loha.write(random, tmp_path / "random")
    bb = ah.Backbone(tiny_llama(), max_rank=4)
    bb.load(tmp_path / "random", name="random")
    assert (routed(bb, "random") - peft_logits(tmp_path / "random")).abs().max() < ATOL


def broken_copy(source: Path, target: Path, edit) -> Path:
    """A copy of an adapter directory whose tensors went through edit(dict) -> dict."""
    shutil.copytree(source, target)
    file = target / "adapter_model.safetensors"
    save_file(edit(load_file(file)), file)
    return target


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: {k: v for k, v in t.items() if k != f"{Q0}.hada_w2_b"}, r"not \['hada_w2_b'\]"),
        (lambda t: {**t, f"{Q0}.hada_w2_a": torch.zeros(32, 5)}, r"hada_w2_a has shape \(32, 5\), expected \(32, 4\)"),
        (
            lambda t: {**t, f"{Q0}.hada_w1_a": torch.zeros(40, 4), f"{Q0}.hada_w2_a": torch.zeros(40, 4)},
            r"hada_w1_a has shape \(40, 4\), expected \(32, 4\) for this backbone",
        ),
        (lambda t: {**t, f"{Q0}.hada_t1": torch.zeros(4, 4, 3, 3)}, r"hada_t1.*use_effective_conv2d"),
    ],
)
def test_bad_tensors_are_refused(dirs, tmp_path, edit, message):
    bb = ah.Backbone(tiny_llama(), max_rank=16)
    with pytest.raises(ah.AdapterError, match=message):
        bb.load(broken_copy(dirs["a"], tmp_path / "broken", edit))
    assert bb.names == []


def test_rank_beyond_max_rank_names_the_max_rank_it_needs(dirs):
    bb = ah.Backbone(tiny_llama(), max_rank=8)  # LoHa r=4 runs at rank 4*4
    with pytest.raises(ah.AdapterError, match=r"rank 16 > max_rank 8.*max_rank >= 16"):
        bb.load(dirs["a"])


class ConvNet(nn.Module):
    """A Linear in a block list (what the Backbone adapts by default) and a 3x3 convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(8, 8)])
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("effective, message", [(True, "hada_t1.*use_effective_conv2d"), (False, "a Conv2d")])
def test_conv_loha_is_refused(tmp_path, effective, message):
    directory = save_peft(
        tmp_path / "conv",
        LoHaConfig(r=2, target_modules=["conv"], use_effective_conv2d=effective),
        seed=4,
        build=ConvNet,
    )
    bb = ah.Backbone(ConvNet(), preallocate=())
    with pytest.raises(ah.AdapterError, match=message):
        bb.load(directory)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=16)).eval()


def test_gpt2_conv1d_is_refused(tmp_path):
    """PEFT's LoHa has no Conv1D layer; files naming one (written here by hand) are refused, as is init."""
    g = torch.Generator().manual_seed(5)
    factors = {".hada_w1_a": (96, 2), ".hada_w1_b": (2, 32), ".hada_w2_a": (96, 2), ".hada_w2_b": (2, 32)}
    write_peft(
        tmp_path,
        {"peft_type": "LOHA", "r": 2, "alpha": 2, "target_modules": ["c_attn"]},
        {"transformer.h.0.attn.c_attn": {k: torch.randn(s, generator=g) for k, s in factors.items()}},
        {},
    )
    bb = ah.Backbone(tiny_gpt2(), preallocate=())
    with pytest.raises(ah.AdapterError, match=r"'transformer\.h\.0\.attn\.c_attn', a Conv1D.*nn\.Linear modules only"):
        bb.load(tmp_path)
    with pytest.raises(ah.AdapterError, match="a Conv1D"):
        registry().get("loha").init(tiny_gpt2(), {"r": 2})


def test_registry_lists_loha_from_its_distribution():
    row = next(row for row in registry().listing() if row.name == "loha")
    assert (row.distribution, row.version, row.aliases) == ("adapterhub-loha", "0.1.0", ("LOHA",))
    assert row.hooks == ("adapter_types",)
    assert json.dumps(registry().get("loha").config_schema)  # a JSON Schema, as the contract asks


def peft_active(directories: dict[str, Path]) -> torch.Tensor:
    """PEFT with every adapter of `directories` active at once: its LoHa layers add each active adapter's delta."""
    names = list(directories)
    model = PeftModel.from_pretrained(tiny_llama(), directories[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(directories[name], adapter_name=name)
    model.base_model.set_adapter(names)
    with torch.no_grad():
        return model.eval()(IDS).logits


def scaled(weight: float):
    """An edit for broken_copy multiplying every hada_w1_a by weight: LoHa's delta is linear in it."""
    return lambda t: {k: v * weight if k.endswith(".hada_w1_a") else v for k, v in t.items()}


def blend(weights, method="cat", names=("a", "b"), **options) -> dict:
    return {"adapters": [{"name": n, "weight": w} for n, w in zip(names, weights)], "method": method, **options}


def cat_backbone(dirs) -> ah.Backbone:
    bb = ah.Backbone(tiny_llama(), max_adapters=4, max_rank=16)
    for name, directory in dirs.items():
        bb.load(directory, name=name)
    return bb


def test_cat_equals_peft_with_both_adapters_active(dirs, refs):
    """cat with weights (1, 1) adds both deltas in every layer, as PEFT does with both adapters active."""
    bb = cat_backbone(dirs)
    expected = peft_active({"a": dirs["a"], "b": dirs["b"]})
    for name in ("a", "b"):  # both adapters count: the sum is neither of them alone
        assert (expected - refs[name]).abs().max() > 1e-2
    assert (routed(bb, blend([1.0, 1.0])) - expected).abs().max() < ATOL
    assert (routed(bb, {"adapters": {"a": 1.0, "b": 1.0}}) - expected).abs().max() < ATOL  # "cat" by default
    assert bb.names == ["a", "b", "lora"]  # cat merges nothing into a slot of its own


def test_cat_weights_scale_each_adapters_delta(dirs, tmp_path):
    """cat (0.6, -0.3) equals PEFT with both active, each copy's hada_w1_a multiplied by its weight."""
    bb = cat_backbone(dirs)
    expected = peft_active(
        {
            "a": broken_copy(dirs["a"], tmp_path / "a", scaled(0.6)),
            "b": broken_copy(dirs["b"], tmp_path / "b", scaled(-0.3)),
        }
    )
    assert (expected - peft_active({"a": dirs["a"], "b": dirs["b"]})).abs().max() > 1e-2  # the weights count
    diff = (routed(bb, blend([0.6, -0.3])) - expected).abs().max().item()
    print(f"loha cat (0.6, -0.3): max abs diff vs PEFT {diff:.2e}")
    assert diff < ATOL


def test_cat_rows_mixed_with_single_and_base_rows_equal_each_alone(dirs, refs):
    bb = cat_backbone(dirs)
    rows = [blend([0.6, -0.3]), "lora", None, blend([0.5, 1.5], names=("b", "a")), "a"]
    mixed = routed(bb, rows)
    for i, row in enumerate(rows):
        assert (mixed[i] - routed(bb, row, IDS[i : i + 1])[0]).abs().max() < ATOL
    assert torch.equal(mixed[2], refs["base"][2])  # the base row passes through exactly
    with torch.no_grad(), bb.use(rows, lengths=[IDS.size(1)] * len(rows)):  # the server's packed steps: per token
        packed = bb.model(IDS.reshape(1, -1)).logits
    first = routed(bb, rows[0], IDS[:1])[0]
    assert (packed[0, : IDS.size(1)] - first).abs().max() < ATOL  # the first sequence sees itself only


@pytest.mark.parametrize(("method", "options"), [("linear", {}), ("svd", {}), ("ties", {"density": 0.5})])
def test_methods_other_than_cat_are_refused_by_name(dirs, refs, method, options):
    """PEFT defines no add_weighted_adapter for LoHa: only "cat", which the registry lists too."""
    assert registry().get("loha").composition_methods() == ("cat",)
    assert next(r for r in registry().listing() if r.name == "loha").composition_methods == ("cat",)
    bb = cat_backbone(dirs)
    with pytest.raises(ah.AdapterError, match=f"loha adapters compose by \\['cat'\\], not by \"{method}\""):
        routed(bb, blend([0.6, 0.4], method, **options))
    assert bb.names == ["a", "b", "lora"]  # nothing was materialized
    assert (routed(bb, "a") - refs["a"]).abs().max() < ATOL  # the refused routing did not linger
