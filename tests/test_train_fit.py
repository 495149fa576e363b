"""adapterhub.train.fit with every strategy on tiny backbones and a real character-level tokenizer:
learning happens, runs reproduce and resume, results load back (Backbone and PEFT), bad input
is refused clearly and leaves no half-written directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import tiny_bert_cls, tiny_llama, tiny_tokenizer

import adapterhub as ah
from adapterhub import train

TESTS = Path(__file__).parent
TOKENIZER = tiny_tokenizer()


def _classification_data(n: int = 48) -> list[dict]:
    """Three classes a character model can tell apart: the text's first letter."""
    words = {0: "apple", 1: "moon", 2: "zebra"}
    return [{"text": f"{words[k % 3]} {k}", "label": k % 3} for k in range(n)]


def _completion_data(n: int = 24, adapter: str | None = None) -> list[dict]:
    rows = [{"prompt": f"say {k % 4}:", "completion": " ok" if adapter != "b" else " no"} for k in range(n)]
    return [{**r, "adapter": adapter} if adapter else r for r in rows]


def _fit(model, strategy, data, **kwargs):
    options = dict(tokenizer=TOKENIZER, epochs=2, batch_size=8, progress=False, seed=0)
    return train.fit(model, strategy, data, **{**options, **kwargs})


STRATEGIES = {
    "feature_extraction": lambda: train.FeatureExtraction(),
    "full": lambda: train.FullFineTuning(scratch_lr=3e-2, ratio=10),
    "discriminative": lambda: train.DiscriminativeLR(),
    "progressive": lambda: train.ProgressiveUnfreezing(),
    "lora": lambda: train.AdapterTuning("lora", {"r": 4, "target_modules": ["query", "value"]}),
    "ia3": lambda: train.AdapterTuning(
        "ia3", {"target_modules": ["value", "intermediate.dense"], "feedforward_modules": ["intermediate.dense"]}
    ),
    "bottleneck": lambda: train.AdapterTuning("bottleneck", {"config": {"reduction_factor": 2}}),  # width 16
    "prompt_tuning": lambda: train.AdapterTuning("prompt_tuning", {"num_virtual_tokens": 12}),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_learns_a_classifier_and_saves_it(name, tmp_path):
    model = tiny_bert_cls()
    data = _classification_data()
    before = train.evaluate(model, train.Strategy(), _examples(model, data), train.CLASSIFICATION, 16, 0)
    result = _fit(
        model, STRATEGIES[name](), data, eval=data, epochs=6, lr=5e-2 if name != "full" else None, output_dir=tmp_path
    )
    assert result.history[-1]["eval_loss"] < before["eval_loss"]
    assert result.best is not None and (tmp_path / "best").is_dir()
    total = sum(p.numel() for p in model.parameters())
    assert 0 < result.trainable_parameters <= total
    if name in ("lora", "ia3", "bottleneck", "prompt_tuning", "feature_extraction"):
        assert result.trainable_parameters < total / 10


def _examples(model, data):
    from adapterhub.train.data import prepare

    return prepare(data, TOKENIZER, model, train.CLASSIFICATION)


def test_feature_extraction_trains_only_the_head(tmp_path):
    model = tiny_bert_cls()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("classifier")}
    _fit(model, train.FeatureExtraction(), _classification_data(), output_dir=tmp_path, checkpoints=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # checkpoints=False: the result only
    head = load_file(tmp_path / "best" / "head.safetensors")
    assert sorted(head) == ["classifier.bias", "classifier.weight"]
    fresh = tiny_bert_cls()
    fresh.load_state_dict(head, strict=False)
    torch.testing.assert_close(fresh.classifier.weight, model.classifier.weight)


def test_progressive_unfreezing_schedule_and_discriminative_rates():
    model = tiny_bert_cls()
    strategy = train.ProgressiveUnfreezing(decay=2.0)
    strategy.attach(model)
    groups = train.layer_groups(model)
    assert len(groups) == 4  # embeddings, 2 blocks, pooler + classifier
    rates = [g["lr"] for g in strategy.param_groups(0.8)]
    assert rates == [0.1, 0.2, 0.4, 0.8]
    for epoch, trainable in (
        (0, [False, False, False, True]),
        (1, [False, False, True, True]),
        (3, [True, True, True, True]),
    ):
        strategy.on_epoch(epoch)
        assert [all(p.requires_grad for p in g) for g in groups] == trainable
        assert strategy.trainable_count() == sum(p.numel() for g, t in zip(groups, trainable) if t for p in g)


def test_full_fine_tuning_rate_is_a_fraction_of_scratch():
    assert train.FullFineTuning(scratch_lr=1e-3, ratio=40).default_lr == pytest.approx(2.5e-5)
    with pytest.raises(train.TrainingError, match="ratio"):
        train.FullFineTuning(ratio=0.5)


def test_same_seed_same_loss_curve():
    runs = [
        _fit(tiny_llama(), train.AdapterTuning("lora", {"r": 4}), _completion_data(), lr=1e-2).losses for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 6
    other = _fit(tiny_llama(), train.AdapterTuning("lora", {"r": 4}), _completion_data(), lr=1e-2, seed=1).losses
    assert other != runs[0]


def test_fit_takes_an_options_object_with_keyword_overrides():
    options = train.FitOptions(epochs=1, batch_size=8, lr=1e-2, progress=False)
    strategy = lambda: train.AdapterTuning("lora", {"r": 4})  # noqa: E731
    one = train.fit(tiny_llama(), strategy(), _completion_data(), tokenizer=TOKENIZER, options=options)
    assert len(one.losses) == 3 and len(one.history) == 1
    two = train.fit(tiny_llama(), strategy(), _completion_data(), tokenizer=TOKENIZER, options=options, epochs=2)
    assert len(two.losses) == 6 and two.losses[:3] == one.losses  # the same run, one epoch longer
    with pytest.raises(train.TrainingError, match=r"unknown option\(s\) \['epoch'\].*FitOptions' fields"):
        train.fit(tiny_llama(), strategy(), _completion_data(), tokenizer=TOKENIZER, epoch=2)


KILLED_RUN = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from tiny_models import tiny_llama, tiny_tokenizer
    from test_train_fit import _completion_data
    from adapterhub import train

    def kill(info):
        if info["step"] == {kill_at}:
            os._exit(9)  # as a SIGKILL would: no cleanup, no exception handlers

    train.fit(tiny_llama(), train.AdapterTuning("lora", {{"r": 4}}), _completion_data(), tokenizer=tiny_tokenizer(),
              epochs=3, batch_size=8, lr=1e-2, seed=0, progress=False, output_dir={out!r}, checkpoint_every=2,
              callbacks=[kill])
""")


@pytest.mark.parametrize("kill_at", [3, 5])  # mid-epoch (after the step-2 checkpoint), right after an epoch's
def test_a_killed_run_resumes_to_the_same_loss_curve(kill_at, tmp_path):
    straight = _fit(
        tiny_llama(),
        train.AdapterTuning("lora", {"r": 4}),
        _completion_data(),
        epochs=3,
        lr=1e-2,
        output_dir=tmp_path / "straight",
    )
    out = tmp_path / "killed"
    code = KILLED_RUN.format(tests=str(TESTS), kill_at=kill_at, out=str(out))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr
    assert not (out / "best").exists() or (out / "best" / "adapter_config.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written directory
    resumed = _fit(
        tiny_llama(), train.AdapterTuning("lora", {"r": 4}), _completion_data(), epochs=3, lr=1e-2, output_dir=out
    )
    assert resumed.losses == straight.losses
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    assert (
        load_file(out / "best" / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "straight" / "best" / "adapter_model.safetensors").keys()
    )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_llama()

    def poison(info):  # a diverged update, as a too-large learning rate would make
        if info["step"] == 4:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(
        train.TrainingError,
        match=r"became nan at step 5 \(task epoch 2, batch 2\).*last good "
        r"checkpoint is kept",
    ):
        _fit(
            model,
            train.AdapterTuning("lora", {"r": 4}),
            _completion_data(),
            epochs=3,
            lr=1e-2,
            output_dir=tmp_path,
            callbacks=[poison],
        )
    from adapterhub.train.checkpoint import load_state

    state = load_state(tmp_path / "checkpoint")
    assert (state["epoch"], state["batch"]) == (1, 0) and len(state["losses"]) == 3
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()
    assert all(torch.isfinite(t).all() for t in state["strategy"].values())


def test_several_adapters_train_in_one_batch_and_load_in_backbone_and_peft(tmp_path):
    model = tiny_llama()
    strategy = train.AdapterTuning("lora", {"r": 4, "lora_alpha": 8}, names=["a", "b"])
    data = [row for pair in zip(_completion_data(adapter="a"), _completion_data(adapter="b")) for row in pair]
    result = _fit(model, strategy, data, eval=data, epochs=4, lr=3e-2, output_dir=tmp_path)
    assert result.history[-1]["eval_accuracy"] > result.history[0]["eval_accuracy"] - 1e-9
    prompt = TOKENIZER("say 1:", return_tensors="pt")["input_ids"]
    fresh = tiny_llama()
    bb = ah.Backbone(fresh, max_adapters=2, max_rank=4)
    for name in ("a", "b"):
        directory = tmp_path / "best" / name
        bb.load(directory, name=name)
        with torch.no_grad(), bb.use(name):
            ours = fresh(prompt).logits
        peft = PeftModel.from_pretrained(tiny_llama(), directory).eval()
        with torch.no_grad():
            torch.testing.assert_close(peft(input_ids=prompt).logits, ours, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the trained adapters stay resident after fit, serving what was saved
        with strategy.backbone.use("a"):
            resident = model(prompt).logits
        with bb.use("a"):
            torch.testing.assert_close(fresh(prompt).logits, resident, rtol=1e-5, atol=1e-6)


def test_domain_adaptation_runs_language_modelling_first(tmp_path):
    strategy = train.DomainAdaptation(train.AdapterTuning("lora", {"r": 4}), ["the moon is bright"] * 16, epochs=2)
    result = _fit(tiny_llama(), strategy, _completion_data(), output_dir=tmp_path, lr=1e-2)
    assert [h["phase"] for h in result.history] == ["domain", "domain", "task", "task"]
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    with pytest.raises(train.TrainingError, match="no language-model head"):
        _fit(
            tiny_bert_cls(),
            train.DomainAdaptation(train.AdapterTuning("lora", {"r": 4}), ["x"]),
            _classification_data(),
        )


@pytest.mark.parametrize(
    "data, model, message",
    [
        ([], tiny_bert_cls, "train data is empty"),
        ([{"text": "apple", "label": 7}], tiny_bert_cls, r"example 0 has label 7; the model has num_labels=3"),
        ([{"text": "apple", "label": "fruit"}], tiny_bert_cls, r"label 'fruit', which is not a label of the model"),
        ([{"text": "apple"}], tiny_bert_cls, r'example 0 needs "text" \(a string\) and "label"'),
        (
            [{"text": "a" * 70, "label": 0}],
            tiny_bert_cls,
            r"example 0 has 70 tokens, more than the backbone's context "
            r"of 64; shorten it, or pass truncate=True",
        ),
        ([{"prompt": "x", "completion": "y", "adapter": "other"}], tiny_llama, r"name adapters \['other'\]"),
        ([{"text": "x"}], lambda: torch.nn.Linear(2, 2), "cannot train a Linear"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(data, model, message, tmp_path):
    with pytest.raises(train.TrainingError, match=message):
        _fit(model(), train.AdapterTuning("lora", {"r": 4}), data, output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "best").exists()


def test_feature_extraction_needs_a_task_head():
    with pytest.raises(train.TrainingError, match="has no task head"):
        _fit(tiny_llama(), train.FeatureExtraction(), _completion_data())


def test_resuming_another_strategy_is_refused(tmp_path):
    _fit(tiny_bert_cls(), train.FeatureExtraction(), _classification_data(), epochs=1, output_dir=tmp_path)
    with pytest.raises(train.TrainingError, match="holds a FeatureExtraction run"):
        _fit(tiny_bert_cls(), STRATEGIES["lora"](), _classification_data(), output_dir=tmp_path)


def test_cli_trains_from_a_toml_file(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    TOKENIZER.save_pretrained(model_dir)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(e) for e in _completion_data()))
    (tmp_path / "run.toml").write_text(
        textwrap.dedent(f"""
        model = "{model_dir}"
        task = "causal_lm"
        strategy = "adapter"
        adapter_type = "lora"
        adapter_config = {{r = 4, lora_alpha = 8, target_modules = ["q_proj", "v_proj"]}}
        data = "{tmp_path / "train.jsonl"}"
        epochs = 1
        output_dir = "{tmp_path / "out"}"
    """)
    )
    cli = [sys.executable, "-m", "adapterhub.cli", "train", "--config", str(tmp_path / "run.toml"), "--lr", "0.01"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["epoch"] == 1
    config = json.loads((tmp_path / "out" / "best" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    bad = subprocess.run(
        cli[:-2] + ["--data", str(tmp_path / "missing-labels.jsonl")], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "missing-labels.jsonl" in bad.stderr


def test_bottleneck_classifier_saves_its_head_and_reloads(tmp_path):
    """adapters' format has no place for a head trained with the adapter: it goes into
    adapterhub_heads.safetensors beside it, and Backbone.load restores it."""
    model, strategy = tiny_bert_cls(), STRATEGIES["bottleneck"]()
    data = _classification_data()
    _fit(model, strategy, data, epochs=3, lr=5e-2, output_dir=tmp_path)
    assert sorted(load_file(tmp_path / "best" / "adapterhub_heads.safetensors")) == [
        "classifier.bias",
        "classifier.weight",
    ]
    probe = TOKENIZER([d["text"] for d in data[:6]], return_tensors="pt", padding=True)
    strategy.backbone.save("adapter", tmp_path / "final")  # the last epoch's weights, resident after fit
    fresh = tiny_bert_cls()
    bb = ah.Backbone(fresh, max_adapters=2, max_rank=16)
    bb.load(tmp_path / "final", name="x")
    with torch.no_grad():
        with bb.use("x"):
            reloaded = fresh(**probe).logits
        with strategy.backbone.use("adapter"):
            trained = model(**probe).logits
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(reloaded, tiny_bert_cls()(**probe).logits, atol=1e-3)
