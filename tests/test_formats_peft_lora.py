"""PEFT's LoRA format, against peft itself: adapters peft saved are read exactly (A, B, scale,
DoRA magnitude, modules_to_save), adapters we write load in peft with the same outputs, and every
kind of bad adapter is refused with an AdapterError that names what is wrong.

Tiny backbones from configs (Llama, GPT-2 with Conv1D, BERT with a classification head); lora_B
and the DoRA magnitudes are randomized, since peft initializes them so that the delta is zero.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import ModulesToSaveWrapper, get_pattern_key
from safetensors.torch import load_file
from tiny_models import broken_copy
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from adapterhub import Adapter
from adapterhub.errors import AdapterError
from adapterhub.formats import read_peft_lora, write_peft_lora
from adapterhub.formats.peft import (
    CONFIG_FILE,
    PICKLE_FILE,
    PREFIX,
    SAFETENSORS_FILE,
    is_targeted,
    pattern_key,
    rank_and_alpha,
    saved_module,
)
from adapterhub.types.lora import LoraType

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]


def base_model(arch: str) -> torch.nn.Module:
    """The same tiny backbone on every call (seeded), so a fresh copy has the original's weights."""
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128
            )
        ).eval()
    if arch == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
        ).eval()
    return BertForSequenceClassification(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=128,
            num_labels=3,
        )
    ).eval()


# case -> (backbone, LoraConfig kwargs)
CASES = {
    "llama_plain": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL)),
    "llama_patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
            alpha_pattern={"o_proj": 3, r"layers\.0\.mlp\.down_proj": 5},
        ),
    ),
    "llama_rslora": (
        "llama",
        dict(
            r=4,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"layers.0.self_attn.v_proj": 3},
        ),
    ),
    "llama_dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama_regex": (
        "llama",
        dict(r=2, lora_alpha=4, target_modules=r".*\.layers\.1\.(self_attn\.[qv]_proj|mlp\.up_proj)"),
    ),
    "llama_layers": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    ),
    "gpt2_fan_in_fan_out": ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_ALL, fan_in_fan_out=True)),
    "gpt2_dora_fan_in_fan_out": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=GPT2_ALL, fan_in_fan_out=True, use_dora=True),
    ),
    "bert_classifier": (
        "bert",
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
    ),
}


def make_peft(arch: str, **lora_kwargs) -> PeftModel:
    """peft model on a fresh backbone with every adapter tensor randomized (nonzero delta)."""
    model = get_peft_model(base_model(arch), LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name or "modules_to_save" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_layers(model: PeftModel) -> dict[str, LoraLayer]:
    return {
        n.removeprefix(PREFIX): m
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    }


def assert_same_adapter(a: Adapter, b: Adapter) -> None:
    """Same type, tensors and the config keys that change outputs (any adapter type)."""
    assert a.type == b.type
    for mine, theirs in ((a.modules, b.modules), (a.modules_to_save, b.modules_to_save)):
        assert mine.keys() == theirs.keys()
        for name, tensors in mine.items():
            assert tensors.keys() == theirs[name].keys(), name
            assert all(torch.equal(t, theirs[name][k]) for k, t in tensors.items()), name
    for key in ("fan_in_fan_out", "use_dora", "use_rslora"):
        assert bool(a.config.get(key)) == bool(b.config.get(key)), key


@pytest.fixture(scope="module", params=sorted(CASES))
def peft_case(request, tmp_path_factory):
    """(backbone, peft model, directory it was saved to) for each case."""
    arch, kwargs = CASES[request.param]
    model = make_peft(arch, **kwargs)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return arch, model, directory


def test_read_matches_peft(peft_case):
    _, model, directory = peft_case
    adapter = read_peft_lora(directory)
    layers = peft_layers(model)

    assert sorted(adapter.modules) == sorted(layers)
    for name, layer in layers.items():
        got = adapter.modules[name]
        assert torch.equal(got["A"], layer.lora_A["default"].weight), name
        assert torch.equal(got["B"], layer.lora_B["default"].weight), name
        assert got["B"].abs().sum() > 0, "lora_B must be randomized for this test to mean anything"
        assert float(got["scale"]) == layer.scaling["default"], name
        if layer.use_dora["default"]:
            assert torch.equal(got["magnitude"], layer.lora_magnitude_vector["default"].weight), name
        else:
            assert "magnitude" not in got
    config = model.peft_config["default"]
    assert (adapter.config.get("fan_in_fan_out", False), adapter.config.get("use_dora", False)) == (
        config.fan_in_fan_out,
        config.use_dora,
    )

    saved = {
        n.removeprefix(PREFIX): m.modules_to_save["default"].state_dict()
        for n, m in model.named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    }
    assert adapter.modules_to_save.keys() == saved.keys()
    for name, state in saved.items():
        assert adapter.modules_to_save[name].keys() == state.keys()
        assert all(torch.equal(adapter.modules_to_save[name][k], t) for k, t in state.items())

    assert LoraType().rank(adapter) == max(layer.r["default"] for layer in layers.values())
    on_disk = load_file(directory / SAFETENSORS_FILE)
    scales = 8 * len(adapter.modules)  # one fp64 scale per module, computed from the config
    assert adapter.nbytes() == sum(t.numel() * t.element_size() for t in on_disk.values()) + scales
    assert adapter.source == str(directory)


def test_written_adapter_loads_in_peft_with_same_outputs(peft_case, tmp_path):
    arch, model, directory = peft_case
    adapter = read_peft_lora(directory)
    write_peft_lora(adapter, tmp_path)

    reloaded = PeftModel.from_pretrained(base_model(arch), tmp_path).eval()
    for name, layer in peft_layers(reloaded).items():
        assert layer.r["default"] == adapter.modules[name]["A"].shape[0], name
        assert layer.scaling["default"] == float(adapter.modules[name]["scale"]), name
    torch.testing.assert_close(outputs(reloaded), outputs(model))
    assert not torch.equal(outputs(model), outputs(base_model(arch))), "the adapter must change the outputs"
    assert_same_adapter(read_peft_lora(tmp_path), adapter)
    with open(tmp_path / SAFETENSORS_FILE, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}


def test_write_adapter_built_in_memory(tmp_path):
    """Ranks and scales that match no single r/alpha, from no config at all, reach peft exactly."""
    g = torch.Generator().manual_seed(3)
    specs = {
        "model.layers.0.self_attn.q_proj": (3, 0.5),
        "model.layers.1.self_attn.q_proj": (5, 2.0),
        "model.layers.1.mlp.down_proj": (5, 1 / 3),
        "model.layers.0.mlp.up_proj": (3, 8 / 3),
    }
    float32_scale = {"model.layers.0.mlp.up_proj": float(torch.tensor(8 / 3))}  # as read back from a slot

    def module(path, r, scale):
        out, inp = {"down_proj": (32, 64), "up_proj": (64, 32)}.get(path.rsplit(".", 1)[1], (32, 32))
        return {
            "A": torch.randn(r, inp, generator=g),
            "B": torch.randn(out, r, generator=g),
            "scale": torch.tensor(scale, dtype=torch.float64),
        }

    adapter = Adapter(
        type="lora",
        config={},
        source="memory",
        modules={p: module(p, r, float32_scale.get(p, s)) for p, (r, s) in specs.items()},
    )
    write_peft_lora(adapter, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert rank_and_alpha(config, "model.layers.0.mlp.up_proj") == (3, 8), "float32 scale of 8/3 at r=3: alpha 8"

    reloaded = PeftModel.from_pretrained(base_model("llama"), tmp_path)
    layers = peft_layers(reloaded)
    assert sorted(layers) == sorted(specs)
    for path, (r, scale) in specs.items():
        assert layers[path].r["default"] == r
        assert layers[path].scaling["default"] == scale
        assert torch.equal(layers[path].lora_B["default"].weight, adapter.modules[path]["B"])
    adapter.modules["model.layers.0.mlp.up_proj"]["scale"] = torch.tensor(8 / 3, dtype=torch.float64)
    assert_same_adapter(read_peft_lora(tmp_path), adapter)


def test_pickle_only_with_opt_in(tmp_path):
    model = make_peft("llama", r=4, lora_alpha=8, target_modules=["q_proj"])
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    model.save_pretrained(tmp_path / "st")
    assert not (tmp_path / "bin" / SAFETENSORS_FILE).exists()

    with pytest.raises(AdapterError, match=rf"{PICKLE_FILE}.*allow_pickle=True"):
        read_peft_lora(tmp_path / "bin")
    assert_same_adapter(read_peft_lora(tmp_path / "bin", allow_pickle=True), read_peft_lora(tmp_path / "st"))


def test_embedding_lora_is_refused(tmp_path):
    make_peft("llama", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]).save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match=r"model\.embed_tokens\.lora_embedding_[AB].*embedding LoRA"):
        read_peft_lora(tmp_path)


def test_unknown_config_keys_are_kept_with_one_warning(good_dir, tmp_path, caplog):
    directory = broken(good_dir, tmp_path, config=lambda c: c.update(future_knob=1, other_knob="x"))
    with caplog.at_level(logging.WARNING, logger="adapterhub"):
        adapter = read_peft_lora(directory)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "future_knob" in warnings[0] and "other_knob" in warnings[0]
    assert adapter.config["future_knob"] == 1


def test_missing_config_points_at_subfolders(good_dir, tmp_path):
    shutil.copytree(good_dir, tmp_path / "inner")
    with pytest.raises(AdapterError, match=r"no adapter_config\.json in .*\['inner'\].*subfolder="):
        read_peft_lora(tmp_path)


# PEFT's matching rules, with peft's own functions as the oracle, on every module name of the backbones.
TARGETING = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.q_proj", "model.layers.1.mlp.up_proj", "query", "c_attn"]),
    dict(target_modules=r".*\.(layers|h|layer)\.1\..*(proj|query|c_fc)"),
    dict(target_modules=["q_proj", "c_proj", "dense"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "c_proj", "dense"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=["q_proj", "c_proj", "dense"], layers_to_transform=[0], layers_pattern=["h", "layer"]),
    dict(target_modules=["q_proj", "k_proj", "c_attn", "dense"], exclude_modules=["k_proj", "output.dense"]),
    dict(
        target_modules=["q_proj", "dense", "c_attn"], exclude_modules=r".*\.layers\.0\.self_attn\.q_proj|.*\.h\.0\.attn"
    ),
    dict(target_modules=["dense", "out_proj", "query"], modules_to_save=["classifier", "pooler"]),
]


@pytest.mark.parametrize("kwargs", TARGETING, ids=[str(i) for i in range(len(TARGETING))])
def test_is_targeted_matches_peft(kwargs):
    config = LoraConfig(**kwargs)
    names = [n for arch in ("llama", "gpt2", "bert") for n, _ in base_model(arch).named_modules() if n]
    assert [is_targeted(kwargs, n) for n in names] == [bool(check_target_module_exists(config, n)) for n in names]
    assert any(is_targeted(kwargs, n) for n in names)


def test_pattern_key_matches_peft():
    patterns = ["layers.1.self_attn.q_proj", "v_proj", r"layers\.0\.mlp\..*", "h.1.attn.c_attn", "1.self_attn.k_proj"]
    names = [n for arch in ("llama", "gpt2") for n, _ in base_model(arch).named_modules() if n]
    for name in names:
        expected = get_pattern_key(patterns, name)
        assert pattern_key(patterns, name) == (expected if expected in patterns else None), name


def test_saved_module_is_the_module_peft_wraps():
    config = LoraConfig(target_modules=["query"], modules_to_save=["classifier", "pooler"])
    model = get_peft_model(base_model("bert"), config)
    wrapped = {n.removeprefix(PREFIX) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    keys = [f"{n}.{p}" for n in wrapped for p in ("weight", "dense.weight")]
    keys.append("bert.encoder.layer.0.output.dense.bias")
    assert {saved_module(k, ["classifier", "pooler"]) for k in keys} == wrapped | {None}


# --- bad adapters ------------------------------------------------------------------------------------

Q = f"{PREFIX}model.layers.0.self_attn.q_proj"
V1 = f"{PREFIX}model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    """A DoRA adapter on q_proj/v_proj of the tiny Llama (r=4, in=out=32): the base of the bad ones."""
    directory = tmp_path_factory.mktemp("good")
    make_peft("llama", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]).save_pretrained(directory)
    return directory


def broken(src: Path, dst: Path, **changes) -> Path:
    return broken_copy(src, dst / "adapter", **changes)


def _truncate(directory: Path) -> None:
    data = (directory / SAFETENSORS_FILE).read_bytes()
    (directory / SAFETENSORS_FILE).write_bytes(data[: len(data) - 100])


def _only_classifier(state: dict) -> None:
    state.clear()
    state[f"{PREFIX}classifier.weight"] = torch.ones(2)


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


def _poison(key, value):
    def change(state):
        state[key] = state[key].clone()
        state[key].view(-1)[3] = value

    return change


# id -> (what to break, regexes the message must contain)
BAD = {
    "no_config": (dict(files=lambda d: (d / CONFIG_FILE).unlink()), [r"no adapter_config\.json in .*adapter"]),
    "invalid_json": (
        dict(files=lambda d: (d / CONFIG_FILE).write_text('{"r": 4,')),
        [r"adapter_config\.json is not valid JSON"],
    ),
    "not_an_object": (dict(files=lambda d: (d / CONFIG_FILE).write_text("[1]")), [r"expected a JSON object, got list"]),
    "peft_type_ia3": (dict(config=lambda c: c.update(peft_type="IA3")), [r"peft_type 'IA3' is not LORA"]),
    "peft_type_missing": (dict(config=lambda c: c.pop("peft_type")), [r"peft_type None is not LORA"]),
    "unsupported_feature": (dict(config=lambda c: c.update(lora_bias=True)), [r"lora_bias=True", r"not supported"]),
    "bad_type": (dict(config=lambda c: c.update(r="4")), [r"adapter_config\.json: r: '4' is not of type 'integer'"]),
    "bad_regex": (dict(config=lambda c: c.update(target_modules="(q_proj")), [r"'\(q_proj' is not a valid regular"]),
    "no_weights": (dict(files=lambda d: (d / SAFETENSORS_FILE).unlink()), [r"no adapter_model\.safetensors"]),
    "truncated": (dict(files=_truncate), [r"adapter/adapter_model\.safetensors is truncated or corrupt"]),
    "A_without_B": (
        dict(tensors=lambda s: s.pop(f"{Q}.lora_B.weight")),
        [rf"{Q}\.lora_A\.weight has no {Q}\.lora_B\.weight"],
    ),
    "B_without_A": (
        dict(tensors=lambda s: s.pop(f"{Q}.lora_A.weight")),
        [rf"{Q}\.lora_B\.weight has no {Q}\.lora_A\.weight"],
    ),
    "rank_mismatch": (
        dict(tensors=_set(f"{Q}.lora_B.weight", torch.ones(32, 3))),
        [rf"{Q}\.lora_B\.weight has shape \(32, 3\), expected \(32, 4\)"],
    ),
    "one_dim": (dict(tensors=_set(f"{Q}.lora_A.weight", torch.ones(128))), [rf"{Q}\.lora_A\.weight \(128,\)"]),
    "config_r": (
        dict(config=lambda c: c.update(r=8)),
        [r"module model\.layers\.0\.self_attn\.q_proj has rank 4", r"gives it r=8"],
    ),
    "rank_pattern": (
        dict(config=lambda c: c.update(rank_pattern={"layers.1.self_attn.v_proj": 2})),
        [r"module model\.layers\.1\.self_attn\.v_proj has rank 4", r"rank_pattern\['layers\.1\.self_attn\.v_proj'\]=2"],
    ),
    "nan": (dict(tensors=_poison(f"{Q}.lora_A.weight", float("nan"))), [rf"{Q}\.lora_A\.weight has 1 NaN/inf"]),
    "inf": (
        dict(tensors=_poison(f"{V1}.lora_magnitude_vector", float("inf"))),
        [rf"{V1}\.lora_magnitude_vector has 1 NaN/inf"],
    ),
    "integer_tensor": (
        dict(tensors=_set(f"{Q}.lora_A.weight", torch.ones(4, 32, dtype=torch.int32))),
        [rf"{Q}\.lora_A\.weight has dtype torch\.int32"],
    ),
    "unexpected_keys": (
        dict(tensors=lambda s: s.update({f"{PREFIX}model.norm.weight": torch.ones(32), "stray": torch.ones(1)})),
        [r"2 unexpected key\(s\)", r"base_model\.model\.model\.norm\.weight", r"stray"],
    ),
    "magnitude_missing": (
        dict(tensors=lambda s: s.pop(f"{V1}.lora_magnitude_vector")),
        [rf"{V1}\.lora_magnitude_vector is missing"],
    ),
    "magnitude_without_dora": (
        dict(config=lambda c: c.update(use_dora=False)),
        [r"lora_magnitude_vector is a DoRA tensor but use_dora is false"],
    ),
    "magnitude_shape": (
        dict(tensors=_set(f"{V1}.lora_magnitude_vector", torch.ones(31))),
        [rf"{V1}\.lora_magnitude_vector has shape \(31,\), expected \(32,\)"],
    ),
    "not_targeted": (
        dict(config=lambda c: c.update(target_modules=["q_proj"])),
        [r"module model\.layers\.0\.self_attn\.v_proj has LoRA tensors but target_modules"],
    ),
    "outside_layers_to_transform": (
        dict(config=lambda c: c.update(layers_to_transform=[0], layers_pattern="layers")),
        [r"module model\.layers\.1\.self_attn\.q_proj has LoRA tensors but"],
    ),
    "excluded": (
        dict(config=lambda c: c.update(exclude_modules=["layers.1.self_attn.v_proj"])),
        [r"module model\.layers\.1\.self_attn\.v_proj has LoRA tensors but"],
    ),
    "outside_regex": (
        dict(config=lambda c: c.update(target_modules=r".*\.layers\.0\..*")),
        [r"module model\.layers\.1\.self_attn\.q_proj has LoRA tensors but"],
    ),
    "only_modules_to_save": (
        dict(tensors=_only_classifier, config=lambda c: c.update(modules_to_save=["classifier"])),
        [r"no tensor ends with .*this is not a LORA adapter"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused(case, good_dir, tmp_path):
    change, patterns = BAD[case]
    directory = broken(good_dir, tmp_path, **change)
    with pytest.raises(AdapterError) as err:
        read_peft_lora(directory)
    for pattern in patterns:
        assert re.search(pattern, str(err.value)), (pattern, str(err.value))
