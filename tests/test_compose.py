"""Compositions equal PEFT's add_weighted_adapter (LoRA on Llama and GPT-2's Conv1D, IA3) and adapters'
average_adapter (bottleneck), per row of mixed batches, materialized once and invalidated by a swap."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig
from safetensors.torch import load_file
from tiny_models import LLAMA_TARGETS, ids, save_peft, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import adapterhub as ah

TOL = dict(rtol=1e-5, atol=1e-5)
WEIGHTS = [0.7, -0.4]
BOTTLENECK = Path(__file__).parent / "fixtures" / "bottleneck"

# name -> (model, [config of each input]); the inputs differ in targets, alpha and (where allowed) rank
PAIRS = {
    "llama": (
        tiny_llama,
        [
            LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS),
            LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"]),
        ],
    ),
    "llama-ranks": (
        tiny_llama,
        [
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]),
        ],
    ),
    "llama-rslora": (
        tiny_llama,
        [
            LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
            LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "o_proj"]),
        ],
    ),
    "gpt2": (
        tiny_gpt2,
        [
            LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
            LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        ],
    ),
}
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ANY_RANK = ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
CASES = [(pair, m) for pair in PAIRS for m in ANY_RANK + (SAME_RANK if pair != "llama-ranks" else ())]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    return {
        pair: [save_peft(build, root / f"{pair}-{k}", seed=k + 1, config=c) for k, c in enumerate(configs)]
        for pair, (build, configs) in PAIRS.items()
    }


@pytest.fixture
def fixed_masks(monkeypatch):
    """DARE's random masks made deterministic for both libraries (PEFT draws from the global RNG), and
    the same for a matrix and its transpose (PEFT prunes GPT-2's Conv1D deltas transposed)."""

    def bernoulli(p, *args, generator=None, **kwargs):  # on each matrix of p (..., rows, cols)
        rows, cols = torch.arange(p.size(-2))[:, None], torch.arange(p.size(-1))[None, :]
        return ((rows + cols) % 5 != 0).to(p.dtype).expand(p.shape)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)


def logits(model, batch):
    with torch.no_grad():
        return model(batch).logits


def spec(names, method, **options):
    return {"adapters": [{"name": n, "weight": w} for n, w in zip(names, WEIGHTS)], "method": method, **options}


def options_for(method):
    return {"density": 0.6} if method.startswith(("ties", "dare", "magnitude")) else {}


def peft_logits(build, dirs, method, batch, **options):
    model = PeftModel.from_pretrained(build(), dirs[0], adapter_name="a0")
    model.load_adapter(dirs[1], adapter_name="a1")
    model.add_weighted_adapter(["a0", "a1"], WEIGHTS, "mixed", combination_type=method, **options)
    model.set_adapter("mixed")
    return logits(model.eval(), batch)


@pytest.mark.parametrize(("pair", "method"), CASES)
def test_lora_methods_match_peft(saved, fixed_masks, pair, method):
    build, _ = PAIRS[pair]
    model = build()
    bb = ah.Backbone(model, max_adapters=4, max_rank=16)
    for k, directory in enumerate(saved[pair]):
        bb.load(directory, name=f"a{k}")
    batch = ids()
    with bb.use(spec(["a0", "a1"], method, **options_for(method))):
        ours = logits(model, batch)
    expected = peft_logits(build, saved[pair], method, batch, **options_for(method))
    assert not torch.allclose(expected, logits(model, batch), atol=1e-3), "the composition must change the output"
    torch.testing.assert_close(ours, expected, **TOL)
    assert len(bb.names) == (2 if method == "cat" else 3)  # "cat" merges nothing; the others take one slot


def test_mixed_batch_equals_each_row_alone(saved):
    """[cat composition, single adapter, base, ties composition] in one batch, packed and per row."""
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=6, max_rank=16)
    for k, directory in enumerate(saved["llama"]):
        bb.load(directory, name=f"a{k}")
    rows = [spec(["a0", "a1"], "cat"), "a1", None, spec(["a1", "a0"], "ties", density=0.5)]
    batch = ids(batch=4)
    alone = torch.cat([logits_routed(bb, model, row, batch[i : i + 1]) for i, row in enumerate(rows)])
    torch.testing.assert_close(logits_routed(bb, model, rows, batch), alone, rtol=0, atol=1e-6)
    with torch.no_grad(), bb.use(rows, lengths=[7] * 4):  # the server's packed steps route per token
        packed = model(batch.reshape(1, -1)).logits
    first = logits_routed(bb, model, rows[0], batch[:1])
    torch.testing.assert_close(packed[0, :7], first[0], rtol=1e-5, atol=1e-5)


def logits_routed(bb, model, names, batch):
    with bb.use(names):
        return logits(model, batch)


def test_materialized_once_and_invalidated_by_swap(saved, tmp_path):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=3, max_rank=16)
    bb.load(saved["llama"][0], name="a0")
    bb.load(saved["llama"][1], name="a1")
    blend = spec(["a0", "a1"], "linear")
    assert bb.compose("blend", blend) == "blend"
    made = bb.composer.materialized
    first = logits_routed(bb, model, "blend", ids())
    torch.testing.assert_close(logits_routed(bb, model, blend, ids()), first)  # the same content: one slot
    assert bb.composer.materialized == made == 1
    key = bb.composition_key("blend")
    other = save_peft(tiny_llama, tmp_path / "other", seed=9, config=PAIRS["llama"][1][1])
    bb.swap("a1", other)
    assert bb.composition_key("blend") != key
    assert len(bb.names) == 2  # the stale materialization was dropped with the swap
    swapped = logits_routed(bb, model, "blend", ids())
    assert bb.composer.materialized == 2 and not torch.allclose(first, swapped)
    # evicted by a load, it comes back from the host cache rather than being merged again
    logits_routed(bb, model, ["a0", "a1", None], ids())  # the inputs used since: the composition is LRU
    bb.load(saved["llama-ranks"][0], name="x")
    assert not any(n.startswith("composition:") for n in bb.names)
    torch.testing.assert_close(logits_routed(bb, model, "blend", ids()), swapped)
    assert bb.composer.materialized == 2
    bb.unload("blend")
    assert "blend" not in bb.compositions


def test_ia3_matches_peft(tmp_path):
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    other = IA3Config(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"])
    dirs = [save_peft(tiny_llama, tmp_path / f"ia3-{k}", seed=k + 1, config=c) for k, c in enumerate([config, other])]
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=4, max_rank=8, preallocate=())
    for k, directory in enumerate(dirs):
        bb.load(directory, name=f"a{k}")
    batch = ids()
    with bb.use(spec(["a0", "a1"], None)):  # IA3's one method, "linear", by default
        ours = logits(model, batch)
    reference = PeftModel.from_pretrained(tiny_llama(), dirs[0], adapter_name="a0")
    reference.load_adapter(dirs[1], adapter_name="a1")
    reference.add_weighted_adapter(["a0", "a1"], WEIGHTS, "mixed")
    reference.set_adapter("mixed")
    torch.testing.assert_close(ours, logits(reference.eval(), batch), **TOL)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize(
    ("case", "weights", "normalize"), [("normalized", [0.7, 0.5], True), ("raw", [0.6, -0.3], False)]
)
def test_bottleneck_average_matches_adapters(kind, case, weights, normalize):
    cls = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    model = copy.deepcopy(cls.from_pretrained(BOTTLENECK / kind / "base").eval())
    want = load_file(BOTTLENECK / kind / "average.safetensors")
    bb = ah.Backbone(model, max_adapters=4, max_rank=16, preallocate=())
    bb.load(BOTTLENECK / kind / "seq_bn")
    bb.load(BOTTLENECK / kind / "seq_bn_b")
    blend = {"adapters": {"seq_bn": weights[0], "seq_bn_b": weights[1]}, "normalize_weights": normalize}
    with torch.no_grad(), bb.use(blend):
        out = model(want["ids"], output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], want[f"{case}.hidden"], **TOL)
    torch.testing.assert_close(out.logits, want[f"{case}.logits"], **TOL)


def test_refusals_name_the_problem(saved, tmp_path):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=6, max_rank=16, preallocate=())
    bb.load(saved["llama"][0], name="a0")
    bb.load(saved["llama-ranks"][1], name="r4")
    prompt = save_peft(
        tiny_llama, tmp_path / "pt", seed=1, config=PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    )
    bb.load(prompt, name="pt")
    bb.load(
        save_peft(
            tiny_llama, tmp_path / "pt2", seed=2, config=PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
        ),
        name="pt2",
    )
    ia3 = save_peft(
        tiny_llama, tmp_path / "ia3", seed=1, config=IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    )
    bb.load(ia3, name="ia3")
    refused = {
        "prompt_tuning adapters cannot be composed": spec(["pt", "pt2"], None),
        "mixes adapter types": spec(["a0", "ia3"], "cat"),
        "needs adapters of one rank": spec(["a0", "r4"], "linear"),
        "compose by": spec(["a0", "r4"], "bogus"),
        "needs a density": spec(["a0", "r4"], "ties"),
        "no adapter named 'missing'": spec(["a0", "missing"], "cat"),
        "more than once": {"adapters": [["a0", 1], ["a0", 2]]},
        "unknown field": {"adapters": ["a0"], "denstiy": 0.5},
        ".weight must be a finite number": {"adapters": [{"name": "a0", "weight": "x"}]},
    }
    for message, bad in refused.items():
        with pytest.raises(ah.AdapterError, match=message), bb.use(bad):
            pass
    assert sorted(bb.names) == ["a0", "ia3", "pt", "pt2", "r4"]  # nothing half-made
    with bb.use(spec(["a0", "r4"], "cat")):  # the routing of the refused batches did not linger
        assert bb.table.in_flight
    assert not bb.table.in_flight


@pytest.mark.parametrize(("method", "options"), [("ties", {"density": 0.3}), ("svd", {"svd_rank": 2})])
def test_one_adapter_is_scaled_as_peft_does(saved, method, options):
    """PEFT combines a single adapter by "linear" whatever the method asked for: no pruning, no SVD."""
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=4, max_rank=16)
    bb.load(saved["llama"][0], name="a0")
    batch = ids()
    with bb.use({"adapters": [{"name": "a0", "weight": 0.7}], "method": method, **options}):
        ours = logits(model, batch)
    reference = PeftModel.from_pretrained(tiny_llama(), saved["llama"][0], adapter_name="a0")
    reference.add_weighted_adapter(["a0"], [0.7], "one", combination_type=method, **options)
    reference.set_adapter("one")
    torch.testing.assert_close(ours, logits(reference.eval(), batch), **TOL)


def test_rewritten_inputs_and_unequal_module_ranks(saved, tmp_path):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=6, max_rank=16)
    bb.load(saved["llama"][0], name="a0")
    bb.load(saved["llama"][1], name="a1")
    blend = spec(["a0", "a1"], "linear")
    before = logits_routed(bb, model, blend, ids())
    adapter = bb._extract("a0")
    for tensors in adapter.modules.values():
        tensors["B"] = tensors["B"] * 3
    bb.rewrite("a0", adapter)  # trained in place: its digest stays, what was merged from it must not
    after = logits_routed(bb, model, blend, ids())
    assert not torch.allclose(before, after, atol=1e-4)
    fresh = ah.Backbone(tiny_llama(), max_adapters=4, max_rank=16)
    fresh.add("a0", adapter)
    fresh.load(saved["llama"][1], name="a1")
    torch.testing.assert_close(after, logits_routed(fresh, fresh.model, blend, ids()), **TOL)

    patterned = LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, rank_pattern={"q_proj": 4})
    bb.load(save_peft(tiny_llama, tmp_path / "patterned", seed=5, config=patterned), name="p")
    with (
        pytest.raises(ah.AdapterError, match=r"q_proj' with ranks \[8, 4\]"),
        bb.use(spec(["a0", "p"], "ties", density=0.5)),
    ):
        pass
    with pytest.raises(ah.AdapterError, match="above 0"), bb.use(spec(["a0", "a1"], "dare_linear", density=0)):
        pass
    with pytest.raises(ah.AdapterError, match="compositions' own"):
        bb.load(saved["llama"][0], name="composition:mine")


def test_a_pinned_materialization_is_not_reused_after_its_input_changes(saved):
    """rewrite (or training) keeps an input's digest; a materialization still in use must not be
    found again for the new weights, and errors from a merge name adapters, not server paths."""
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=6, max_rank=16)
    bb.load(saved["llama"][0], name="a0")
    bb.load(saved["llama"][1], name="a1")
    blend = spec(["a0", "a1"], "ties", density=0.5)
    first = bb.materialize(blend, pin=True)  # a request in flight holds it
    adapter = bb._extract("a0")
    for tensors in adapter.modules.values():
        tensors["B"] = tensors["B"] * 3
    bb.rewrite("a0", adapter)
    second = bb.materialize(blend, pin=True)
    assert second != first and first in bb.names  # the old one stays for its users, never found again
    fresh = ah.Backbone(tiny_llama(), max_adapters=4, max_rank=16)
    fresh.add("a0", adapter)
    fresh.load(saved["llama"][1], name="a1")
    torch.testing.assert_close(logits_routed(bb, model, second, ids()), logits_routed(fresh, fresh.model, blend, ids()))

    dora = saved["llama"][0].parent / "dora"
    save_peft(tiny_llama, dora, seed=3, config=LoraConfig(r=8, lora_alpha=8, use_dora=True, target_modules=["q_proj"]))
    bb.load(dora, name="d")
    with pytest.raises(ah.AdapterError, match=r"^adapter 'd': DoRA adapters cannot be composed"):
        bb.materialize(spec(["d", "a1"], "linear"))


def test_inputs_changed_in_place_keep_their_own_merges_and_files(saved):
    """Two names of one file, each rewritten differently, get merges of their own weights (their
    digests stay alike); a rewritten adapter evicted never comes back as its files' content."""
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=6, max_rank=16)
    for name in ("a", "b"):
        bb.load(saved["llama"][0], name=name)
    bb.load(saved["llama"][1], name="c")
    rewritten = {}
    for name, factor in (("a", 3.0), ("b", -2.0)):
        adapter = bb._extract(name)
        for tensors in adapter.modules.values():
            tensors["B"] = tensors["B"] * factor
        bb.rewrite(name, adapter)
        rewritten[name] = adapter
    made = {name: bb.materialize(spec([name, "c"], "linear")) for name in ("a", "b")}
    assert made["a"] != made["b"]
    fresh = ah.Backbone(tiny_llama(), max_adapters=4, max_rank=16)
    fresh.add("b", rewritten["b"])
    fresh.load(saved["llama"][1], name="c")
    want = logits_routed(fresh, fresh.model, spec(["b", "c"], "linear"), ids())
    torch.testing.assert_close(logits_routed(bb, model, spec(["b", "c"], "linear"), ids()), want)

    small = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=16)
    small.load(saved["llama"][0], name="a")
    files = logits_routed(small, small.model, "a", ids())
    small.rewrite("a", rewritten["a"])
    small.load(saved["llama"][1], name="p")
    small.load(saved["llama-ranks"][0], name="q")  # evicts the rewritten "a" to the host cache
    assert "a" not in small.names
    small.load(saved["llama"][0], name="again")  # the files themselves, not a's rewritten weights
    torch.testing.assert_close(logits_routed(small, small.model, "again", ids()), files)
