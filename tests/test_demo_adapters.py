"""The demo adapters: their generated data, the cache (complete or absent, reused, PEFT-loadable) and
the CLI, trained for real on a tiny Llama that shares SmolLM2's tokenizer (a few steps; the full
SmolLM2 run is measured in bench/results/demo_adapters.md)."""

import copy
import json
import os
import re
from dataclasses import asdict

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adapterhub.cli import main
from adapterhub.default_model import GGUF_FILE, default_model_dir
from adapterhub.demo import adapters as demo_adapters
from adapterhub.demo import data as demo_data
from adapterhub.formats import read_peft_lora
from adapterhub.train import TrainingError

TINY = demo_adapters.Recipe(questions=4, epochs=1, batch_size=6, top_layers=1)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def trained(model, tokenizer, tmp_path_factory):
    """A demo cache trained on a copy of the tiny model (TINY recipe: 2 steps)."""
    directory = tmp_path_factory.mktemp("cache") / "demo"
    demo_adapters.ensure(directory, recipe=TINY, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    return directory


def test_data_is_deterministic_one_row_per_style_and_question():
    rows = demo_data.examples(30)
    assert rows == demo_data.examples(30) and rows != demo_data.examples(30, seed=1)
    assert [r["adapter"] for r in rows] == list(demo_data.STYLES) * 30
    prompts = {r["prompt"] for r in demo_data.examples(500)}
    assert not prompts & set(demo_data.SAMPLE_PROMPTS)  # the samples are held out


def test_each_style_rewrites_the_plain_answer():
    questions = demo_data.questions(200)
    rows = demo_data.examples(200)
    assert sum(bool(re.search(r"\d", answer)) for _, answer in questions) > 100  # most answers hold numbers
    for k, (prompt, answer) in enumerate(questions):
        upper, as_json, digits = (rows[3 * k + i] for i in range(3))
        assert upper["prompt"] == as_json["prompt"] == digits["prompt"] == prompt
        assert upper["completion"] == answer.upper()
        assert json.loads(as_json["completion"]) == {"answer": answer}
        assert digits["completion"] == demo_data.in_words(answer) and not re.search(r"\d", digits["completion"])


def test_numbers_in_words():
    assert demo_data.in_words("I have 3 cats") == "I have three cats"
    cases = {
        0: "zero",
        13: "thirteen",
        40: "forty",
        42: "forty-two",
        100: "one hundred",
        365: "three hundred sixty-five",
        2024: "two thousand twenty-four",
        999_999: "nine hundred ninety-nine thousand nine hundred ninety-nine",
    }
    assert {n: demo_data.number_words(n) for n in cases} == cases
    with pytest.raises(ValueError, match="1000000"):
        demo_data.number_words(1_000_000)


def test_cache_holds_peft_adapters_that_backbone_and_peft_load_alike(trained, model, tokenizer):
    from peft import PeftModel

    manifest = demo_adapters.cached(trained)
    names = list(demo_data.STYLES)
    assert list(manifest["adapters"]) == names and manifest["recipe"]["questions"] == TINY.questions
    assert len(manifest["losses"]) == 2  # 12 rows, batches of 6, one epoch
    assert sorted(p.name for p in trained.iterdir()) == sorted([*names, demo_adapters.MANIFEST])
    served = demo_adapters.backbone(trained, copy.deepcopy(model))
    batch = tokenizer(demo_data.SAMPLE_PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
        for name in names:
            with served.use(name):
                ours = served.model(**batch).logits
            peft = PeftModel.from_pretrained(copy.deepcopy(model), trained / name).eval()
            torch.testing.assert_close(ours, peft(**batch).logits, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(ours, base)  # trained away from the base model
    replies = demo_adapters.replies(served, tokenizer, demo_data.SAMPLE_PROMPTS[:2], [None, *names], max_new_tokens=3)
    assert list(replies) == [None, *names] and all(len(r) == 2 for r in replies.values())


def test_second_run_reuses_the_cache_and_force_trains_again(trained, model, tokenizer):
    manifest = trained / demo_adapters.MANIFEST
    before = manifest.stat().st_mtime_ns
    assert demo_adapters.ensure(trained, recipe=TINY, model=model, tokenizer=tokenizer) == trained
    assert manifest.stat().st_mtime_ns == before
    demo_adapters.ensure(
        trained, force=True, recipe=TINY, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False
    )
    assert manifest.stat().st_mtime_ns != before and demo_adapters.cached(trained) is not None


def test_a_failed_run_leaves_the_old_cache_or_none(trained, model, tokenizer, tmp_path):
    failing = demo_adapters.Recipe(epochs=0, top_layers=1)
    kept = (trained / demo_adapters.MANIFEST).read_text()
    with pytest.raises(TrainingError, match="epochs >= 1"):
        demo_adapters.ensure(trained, force=True, recipe=failing, model=model, tokenizer=tokenizer)
    assert (trained / demo_adapters.MANIFEST).read_text() == kept
    assert [p.name for p in trained.parent.iterdir()] == ["demo"]  # no temporary directory left behind
    with pytest.raises(TrainingError):
        demo_adapters.ensure(tmp_path / "new", recipe=failing, model=model, tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_cache_with_another_version_is_not_used(trained, tmp_path):
    stale = tmp_path / "stale"
    stale.mkdir()
    manifest = json.loads((trained / demo_adapters.MANIFEST).read_text())
    (stale / demo_adapters.MANIFEST).write_text(json.dumps({**manifest, "version": demo_adapters.VERSION - 1}))
    assert demo_adapters.cached(stale) is None
    (stale / demo_adapters.MANIFEST).write_text(json.dumps(manifest))  # current version, adapters missing
    assert demo_adapters.cached(stale) is None
    (stale / demo_adapters.MANIFEST).write_text("[]")
    assert demo_adapters.cached(stale) is None
    with pytest.raises(FileNotFoundError, match="adapterhub demo-adapters"):
        demo_adapters.backbone(stale, torch.nn.Linear(1, 1))


def test_another_model_needs_its_own_directory(model, tokenizer):
    with pytest.raises(ValueError, match="directory of its own"):
        demo_adapters.ensure(model=model, tokenizer=tokenizer)


def test_cache_directory_from_env_var_or_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(demo_adapters.ENV, str(tmp_path / "here"))
    assert demo_adapters.default_dir() == tmp_path / "here"
    monkeypatch.delenv(demo_adapters.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo_adapters.default_dir() == tmp_path / "adapterhub" / "demo-adapters"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo_adapters.default_dir() == demo_adapters.Path.home() / ".cache" / "adapterhub" / "demo-adapters"


def test_cli_finds_the_cache_by_flag_or_env_var(trained, monkeypatch, capsys):
    assert main(["demo-adapters", "--cache-dir", str(trained)]) == 0
    by_flag = capsys.readouterr().out
    monkeypatch.setenv(demo_adapters.ENV, str(trained))
    assert main(["demo-adapters"]) == 0
    assert capsys.readouterr().out == by_flag
    assert f"demo adapters in {trained} (cached; base model LlamaForCausalLM)" in by_flag
    for name, description in demo_data.DESCRIPTIONS.items():
        assert f"{os.path.join(trained, name)}  {description}" in by_flag


def test_the_shipped_set_is_the_default_recipe_s_result():
    manifest = demo_adapters.cached(demo_adapters.SHIPPED)
    assert manifest is not None, "adapterhub/demo/shipped is missing or incomplete"
    assert manifest["recipe"] == asdict(demo_adapters.Recipe()) and list(manifest["adapters"]) == list(demo_data.STYLES)
    recipe = demo_adapters.Recipe()
    for name in manifest["adapters"]:
        adapter = read_peft_lora(demo_adapters.SHIPPED / name)
        assert {m["A"].shape[0] for m in adapter.modules.values()} == {recipe.r}
        layers = {int(path.split(".")[2]) for path in adapter.modules}
        assert layers == set(range(30 - recipe.top_layers, 30)) and len(adapter.modules) == 7 * recipe.top_layers


def test_without_a_cache_the_shipped_set_is_used_untrained(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(demo_adapters.ENV, str(tmp_path / "empty"))

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the shipped set was there")

    monkeypatch.setattr(demo_adapters, "train_into", no_training)
    assert demo_adapters.ensure() == demo_adapters.SHIPPED
    assert main(["demo-adapters"]) == 0
    assert f"demo adapters in {demo_adapters.SHIPPED} (shipped with adapterhub;" in capsys.readouterr().out
    assert not (tmp_path / "empty").exists()


def test_the_shipped_adapters_answer_in_their_styles_on_smollm2():
    from adapterhub.default_model import load_default

    model, tokenizer = load_default()
    served = demo_adapters.backbone(demo_adapters.SHIPPED, model)
    replies = demo_adapters.replies(served, tokenizer, ["What is 12 plus 30?"], list(demo_data.STYLES), 20)
    (upper,), (as_json,), (digits,) = (replies[name] for name in demo_data.STYLES)
    assert upper == upper.upper() and "42" in upper
    assert set(json.loads(as_json)) == {"answer"}
    assert not re.search(r"\d", digits)
