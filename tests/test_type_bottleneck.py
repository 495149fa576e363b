"""The `bottleneck` type against AdapterHub `adapters` itself.

tests/fixtures/bottleneck holds tiny BERT and Llama models, seq_bn and double_seq_bn adapters saved by
adapters 1.3.0 and the outputs adapters computed with them (tests/fixtures/make_bottleneck_fixtures.py,
run in adapters' own environment: adapters pins transformers~=4.57). Here the same base loads with our
transformers, the adapters load through the Backbone, and the outputs must match adapters' within fp32
rounding; mixed batches, save/load, init and bad input are checked on the same models.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertModel

from adapterhub import AdapterError, Backbone
from adapterhub.plugins import registry
from adapterhub.types.bottleneck import recognize_adapter

FIXTURES = Path(__file__).parent / "fixtures" / "bottleneck"
PRESETS = ("seq_bn", "double_seq_bn")
KINDS = ("bert", "llama")
TOL = dict(rtol=1e-5, atol=1e-5)


def base(kind: str):
    """A fresh copy of the fixture's base model (a Backbone hooks into the model it is given)."""
    return copy.deepcopy(_loaded(kind))


@functools.cache
def _loaded(kind: str):
    cls = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    return cls.from_pretrained(FIXTURES / kind / "base").eval()


def expected(kind: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / kind / "expected.safetensors")


def backbone(model, max_rank: int = 8) -> Backbone:
    return Backbone(model, max_adapters=4, max_rank=max_rank, preallocate=())


def hidden(bb: Backbone, names, ids: torch.Tensor) -> torch.Tensor:
    """The last layer's output (n, T, H) with `names` routed."""
    with torch.no_grad(), bb.use(names):
        return bb.model(ids, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_outputs_match_adapters(kind, preset):
    """adapters' own outputs, with the adapter active and with none, from the files adapters saved."""
    model, want = base(kind), expected(kind)
    bb = backbone(model)
    assert bb.load(FIXTURES / kind / preset) == preset  # found by recognize_adapter, head files ignored
    with torch.no_grad(), bb.use(preset):
        out = model(want["ids"], output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], want[f"{preset}.hidden"], **TOL)
    torch.testing.assert_close(out.logits, want[f"{preset}.logits"], **TOL)
    assert (want[f"{preset}.hidden"] - want["base.hidden"]).abs().max() > 0.5  # the adapter matters
    torch.testing.assert_close(hidden(bb, None, want["ids"]), want["base.hidden"], **TOL)


def test_live_against_adapters(tmp_path):
    """The same comparison with adapters in this environment (it pins transformers~=4.57, so usually skipped)."""
    adapters = pytest.importorskip(
        "adapters",
        reason="adapters pins transformers~=4.57 and cannot be installed "
        "next to this transformers; tests/fixtures/bottleneck holds its outputs instead",
    )
    reference, ids = base("bert"), expected("bert")["ids"]
    adapters.init(reference)
    reference.add_adapter("live", config="double_seq_bn")
    with torch.no_grad():
        for key, p in reference.named_parameters():
            if ".adapters.live." in key:
                p.copy_(torch.randn_like(p) * 0.3)
    reference.save_adapter(str(tmp_path), "live", use_safetensors=True)
    reference.set_active_adapters("live")
    with torch.no_grad():
        want = reference(ids, output_hidden_states=True).hidden_states[-1]
    bb = backbone(base("bert"))
    bb.load(tmp_path, name="live")
    torch.testing.assert_close(hidden(bb, "live", ids), want, **TOL)


def lora_adapter(model, directory: Path) -> Path:
    """A LoRA adapter with random non-zero weights, written in PEFT's format."""
    lora = registry().get("lora")
    adapter = lora.init(model, {"r": 4, "target_modules": ["query", "value", "q_proj", "v_proj"]})
    g = torch.Generator().manual_seed(3)
    for tensors in adapter.modules.values():
        tensors["B"] = torch.randn(tensors["B"].shape, generator=g) * 0.3
    lora.write(adapter, directory)
    return directory


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_equals_each_row_alone(kind, tmp_path):
    model, ids = base(kind), expected(kind)["ids"]
    bb = backbone(model)
    for preset in PRESETS:
        bb.load(FIXTURES / kind / preset)
    bb.load(lora_adapter(model, tmp_path / "lora"), name="lora")
    rows = ["seq_bn", None, "double_seq_bn", "lora"]
    batch = torch.cat([ids, ids[:1]])  # (4, T)
    mixed = hidden(bb, rows, batch)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i : i + 1], hidden(bb, [name], batch[i : i + 1]), **TOL)
    assert torch.equal(mixed[1], hidden(bb, None, batch)[1])  # base rows keep the model's own outputs exactly
    if kind == "llama":  # generate() with a KV cache: each step sees one position per row
        with torch.no_grad(), bb.use(rows):
            together = model.generate(batch, max_new_tokens=3, do_sample=False)
        for i, name in enumerate(rows):
            with torch.no_grad(), bb.use(name):
                assert torch.equal(
                    together[i : i + 1], model.generate(batch[i : i + 1], max_new_tokens=3, do_sample=False)
                )


def _out_of_memory(*_):
    raise RuntimeError("out of memory (a forward hook standing in for a failure inside the model)")


@pytest.mark.parametrize("kind", KINDS)
def test_a_forward_that_fails_half_way_leaves_nothing_behind(kind):
    """The hooks keep the batch in flight between a module's children; a forward that raises inside
    the attention must not leave it for the next forward, routed or not."""
    model, ids = base(kind), expected(kind)["ids"]
    bb = backbone(model)
    bb.load(FIXTURES / kind / "double_seq_bn")
    plain, adapted = hidden(bb, None, ids), hidden(bb, "double_seq_bn", ids)
    inside = "model.layers.0.self_attn.o_proj" if kind == "llama" else "bert.encoder.layer.0.attention.output.LayerNorm"
    handle = model.get_submodule(inside).register_forward_hook(_out_of_memory)
    with torch.no_grad(), bb.use("double_seq_bn"), pytest.raises(RuntimeError, match="out of memory"):
        model(ids)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(ids, output_hidden_states=True).hidden_states[-1], plain)
    assert torch.equal(hidden(bb, "double_seq_bn", ids), adapted)


@pytest.mark.parametrize("kind", KINDS)
def test_save_writes_what_adapters_wrote(kind, tmp_path):
    """save -> the very files adapters saved (config and tensors), which load back to identical outputs."""
    bb, ids = backbone(base(kind)), expected(kind)["ids"]
    for preset in PRESETS:
        bb.load(FIXTURES / kind / preset)
        bb.save(preset, tmp_path / preset)
        original = FIXTURES / kind / preset
        assert json.loads((tmp_path / preset / "adapter_config.json").read_text()) == json.loads(
            (original / "adapter_config.json").read_text()
        )
        saved, wrote = load_file(tmp_path / preset / "adapter.safetensors"), load_file(original / "adapter.safetensors")
        assert saved.keys() == wrote.keys() and all(torch.equal(saved[k], wrote[k]) for k in saved)
        bb.load(tmp_path / preset, name=f"{preset}-again")
        assert torch.equal(hidden(bb, preset, ids), hidden(bb, f"{preset}-again", ids))


@pytest.mark.parametrize("kind", KINDS)
def test_init_creates_an_adapter_that_loads(kind, tmp_path):
    model = base(kind)
    bottleneck = registry().get("bottleneck")
    adapter = bottleneck.init(
        model,
        {"config": {"mh_adapter": True, "reduction_factor": {"0": 4, "default": 8}, "leave_out": [1]}, "name": "fresh"},
    )
    assert bottleneck.rank(adapter) == 8
    assert all("layer.0" in path or "layers.0" in path for path in adapter.modules)  # leave_out=[1]
    bottleneck.write(adapter, tmp_path / "fresh")
    bb = backbone(model)
    bb.load(tmp_path / "fresh")
    ids = expected(kind)["ids"]
    fresh, plain = hidden(bb, "fresh", ids), hidden(bb, None, ids)
    assert 0 < (fresh - plain).abs().max() < 0.1  # N(0, 0.02) weights: a small change, as adapters' "bert" init


def test_paths_without_the_base_model_prefix_are_placed(tmp_path):
    """adapters saves a bare BertModel's paths (`encoder.layer...`); Backbone.load (through the type's
    `place`) puts them on the model loaded, with or without the prefix, as adapters' load_adapter does."""
    want = expected("bert")
    bare = shutil.copytree(FIXTURES / "bert" / "seq_bn", tmp_path / "bare")
    tensors = load_file(bare / "adapter.safetensors")
    save_file({k.removeprefix("bert."): t for k, t in tensors.items()}, bare / "adapter.safetensors")
    for model, source in (
        (base("bert"), bare),
        (BertModel.from_pretrained(FIXTURES / "bert" / "base").eval(), FIXTURES / "bert" / "seq_bn"),
    ):
        bb = backbone(model)
        bb.load(source, name="placed")
        torch.testing.assert_close(hidden(bb, "placed", want["ids"]), want["seq_bn.hidden"], **TOL)


def broken(tmp_path: Path, kind: str = "bert", preset: str = "seq_bn", *, tensors=None, config=None) -> Path:
    """A copy of a fixture adapter with its tensors dict or its config dict changed in place."""
    directory = shutil.copytree(FIXTURES / kind / preset, tmp_path / "broken", dirs_exist_ok=True)
    if tensors:
        state = load_file(directory / "adapter.safetensors")
        tensors(state)
        save_file({k: t.contiguous() for k, t in state.items()}, directory / "adapter.safetensors")
    if config:
        data = json.loads((directory / "adapter_config.json").read_text())
        config(data["config"])
        (directory / "adapter_config.json").write_text(json.dumps(data))
    return directory


UP = "bert.encoder.layer.0.output.adapters.seq_bn.adapter_up.weight"
DOWN = "bert.encoder.layer.0.output.adapters.seq_bn.adapter_down.0"


def _narrow(state: dict) -> None:
    """All four tensors for hidden size 16: consistent with each other, wrong for the model."""
    for key in [k for k in state if k.startswith("bert.encoder.layer.0.output.")]:
        state[key] = state[key][..., :16] if key.endswith("down.0.weight") else state[key][:16]


def _to_pickle(directory: Path) -> None:
    """The same tensors as pytorch_adapter.bin, as save_adapter writes without use_safetensors."""
    torch.save(load_file(directory / "adapter.safetensors"), directory / "pytorch_adapter.bin")
    (directory / "adapter.safetensors").unlink()


BAD = {
    "no weights": (dict(), "no adapter.safetensors", lambda d: (d / "adapter.safetensors").unlink()),
    "wrong shape": (dict(tensors=lambda s: s.update({UP: s[UP][:, :1]})), f"{UP} has shape (32, 1)", None),
    "wrong hidden size": (dict(tensors=_narrow), "expected (2, 32) for this backbone", None),
    "missing tensor": (dict(tensors=lambda s: s.pop(UP)), f"{UP} is missing", None),
    "NaN": (dict(tensors=lambda s: s[DOWN + ".bias"].fill_(float("nan"))), "NaN", None),
    "unexpected key": (
        dict(tensors=lambda s: s.update({UP.replace("adapter_up", "gate"): s[UP].clone()})),
        "unexpected key",
        None,
    ),
    "ln_after": (dict(config=lambda c: c.update(ln_after=True)), "config.ln_after=True", None),
    "gating": (dict(config=lambda c: c.update(use_gating=True)), "config.use_gating=True", None),
    "parallel": (dict(config=lambda c: c.update(is_parallel=True)), "config.is_parallel=True", None),
    "phm": (dict(config=lambda c: c.update(phm_layer=True)), "config.phm_layer=True", None),
    "learned scaling": (dict(config=lambda c: c.update(scaling="learned")), "config.scaling='learned'", None),
    "bad type": (dict(config=lambda c: c.update(original_ln_after="yes")), "original_ln_after", None),
    "unknown activation": (dict(config=lambda c: c.update(non_linearity="nope")), "config.non_linearity='nope'", None),
    "not placed": (dict(config=lambda c: c.update(output_adapter=False)), "output_adapter is false", None),
    "pickle": (dict(), "pass allow_pickle=True", _to_pickle),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_are_refused_and_change_nothing(case, tmp_path):
    change, message, files = BAD[case]
    bb, ids = backbone(base("bert")), expected("bert")["ids"]
    bb.load(FIXTURES / "bert" / "double_seq_bn", name="good")
    before = hidden(bb, ["good", None, "good"], ids)
    directory = broken(tmp_path, **change)
    if files:
        files(directory)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        bb.load(directory, name="bad", type="bottleneck")
    assert bb.names == ["good"]
    assert torch.equal(hidden(bb, ["good", None, "good"], ids), before)


def test_pickle_loads_when_allowed(tmp_path):
    directory = broken(tmp_path)
    _to_pickle(directory)
    bb, want = backbone(base("bert")), expected("bert")
    bb.load(directory, name="pickled", allow_pickle=True)
    torch.testing.assert_close(hidden(bb, "pickled", want["ids"]), want["seq_bn.hidden"], **TOL)


def test_rank_above_max_rank_and_post_add_on_a_pre_norm_layer_are_refused(tmp_path):
    model = base("llama")
    with pytest.raises(AdapterError, match="rank 8 > max_rank 4"):
        backbone(model, max_rank=4).load(FIXTURES / "llama" / "seq_bn")
    post_add = broken(tmp_path, "llama", "double_seq_bn", config=lambda c: c.update(residual_before_ln="post_add"))
    bb = backbone(model)
    with pytest.raises(AdapterError, match="residual_before_ln='post_add'"):
        bb.load(post_add, name="post_add")
    assert bb.names == []


def test_recognizes_bottleneck_configs_only(tmp_path):
    config = json.loads((FIXTURES / "bert" / "seq_bn" / "adapter_config.json").read_text())
    assert recognize_adapter(FIXTURES / "bert" / "seq_bn", config) == "bottleneck"
    assert recognize_adapter(tmp_path, {"config": "double_seq_bn", "version": "adapters.1.3.0"}) == "bottleneck"
    assert recognize_adapter(tmp_path, {"config": {"architecture": "lora"}, "version": "adapters.1.3.0"}) is None
    assert recognize_adapter(tmp_path, {"peft_type": "LORA"}) is None
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        registry().get("bottleneck").read(tmp_path)
