"""The engine's compiled steps (torch.compile with dynamic shapes): the same tokens as the model
alone, and no recompile as routings, joins, leaves, chunk sizes and adapter versions change."""

from __future__ import annotations

import random

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig
from test_serve_paged import GREEDY, _alone, _engine, _offline, _prompts, _run
from tiny_models import LLAMA_TARGETS, save_peft, tiny_llama
from torch._dynamo.utils import counters

from adapterhub.serve.engine import Engine

IA3 = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def _sources(tmp_path) -> dict:
    """Four LoRA adapters, two IA3 ones, a prompt-tuning one, and l1's next version."""
    lora = {f"l{k}": LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS) for k in range(4)}
    prompt = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    configs = {
        **lora,
        "i0": IA3,
        "i1": IA3,
        "p0": prompt,
        "l1-v2": LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
    }
    return {name: save_peft(tiny_llama, tmp_path / name, 20 + k, c) for k, (name, c) in enumerate(configs.items())}


def _spy_on_routings(engine: Engine) -> list[tuple]:
    """Records every routing (names, token counts) the engine's steps ask the Backbone for."""
    seen, use = [], engine.backbone.use

    def recording(names, **kwargs):
        seen.append((tuple(names), tuple(kwargs.get("lengths") or ())))
        return use(names, **kwargs)

    engine.backbone.use = recording
    return seen


def test_compiled_steps_never_recompile_over_100_routings(tmp_path):
    torch._dynamo.reset()  # no cache entries left by other tests' compiles
    sources = _sources(tmp_path)
    offline = _offline(sources, max_rank=32)
    graphs = []

    def counting(graph, example_inputs):  # dynamo hands every graph it compiles to the backend once
        graphs.append(graph)
        return graph.forward

    engine = _engine(
        tiny_llama(),
        max_adapters=5,  # fewer slots than adapters: evictions, reloads
        max_rank=32,
        adapters={name: sources[name] for name in ("l0", "l1", "l2", "l3", "i0", "i1", "p0")},
        max_batch=4,
        max_step_tokens=9,  # chunked prefill
        compile=counting,
    )
    engine.start()
    try:
        for mix in ([None], ["l0"], ["i0"], ["l0", "i0"]):  # a step of each mix of adapter types: its graph
            _run(engine, [(name, [5, 6, 7]) for name in mix])
        warm = len(graphs)
        assert warm == 4, warm  # {}, {lora}, {ia3}, {lora, ia3}
        routings = _spy_on_routings(engine)
        rng = random.Random(0)
        names = [None, "l0", "l1", "l2", "l3", "i0", "i1", "p0"]  # p0's rows: the base's, with virtual tokens
        for wave in range(4):
            if wave == 2:
                engine.add_adapter("l1", str(sources["l1-v2"]))  # a new version: another slot, new weights
            jobs = [(rng.choice(names), p) for p in _prompts(12, seed=wave)]
            for (name, prompt), tokens in zip(jobs, _run(engine, jobs)):
                offline_name = "l1-v2" if wave >= 2 and name == "l1" else name
                with offline.use(offline_name):
                    assert tokens == _alone(offline.model, prompt, GREEDY.max_tokens), (wave, name)
        assert len(set(routings)) >= 100, len(set(routings))
        assert len(graphs) == warm, f"{len(graphs) - warm} recompiles over {len(set(routings))} routings"
    finally:
        engine.stop()


@pytest.mark.slow
def test_inductor_steps_give_the_tokens_of_the_model_alone(tmp_path):
    """The real compiler (inductor, about 20 s for the tiny model): a LoRA adapter's requests, joining
    and leaving under chunked prefill, equal its generation alone."""
    source = _sources(tmp_path)["l0"]
    offline = _offline({"l0": source}, max_rank=8)
    engine = _engine(
        tiny_llama(), max_rank=8, adapters={"l0": source}, max_batch=3, max_step_tokens=8, compile="inductor"
    )
    torch._dynamo.reset()
    compiled = counters["stats"]["unique_graphs"]
    engine.start()
    try:
        prompts = _prompts(6, seed=4)
        got = _run(engine, [("l0", p) for p in prompts])
        with offline.use("l0"):
            assert got == [_alone(offline.model, p, GREEDY.max_tokens) for p in prompts]
        assert counters["stats"]["unique_graphs"] > compiled  # the steps really ran compiled
        assert engine._step_model.forward is not engine.model  # and never fell back to eager
    finally:
        engine.stop()
        torch._dynamo.reset()


def test_a_failed_compile_falls_back_to_eager_steps():
    """A compiler error is logged once; the request and the ones after it are served eager."""
    calls = []

    def broken(graph, example_inputs):
        calls.append(graph)
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    model = tiny_llama()
    engine = _engine(model, max_rank=8, compile=broken)
    engine.start()
    try:
        prompts = _prompts(3, seed=6)
        for prompt in prompts:
            assert _run(engine, [(None, prompt)]) == [_alone(tiny_llama(), prompt, GREEDY.max_tokens)]
        assert len(calls) == 1
    finally:
        engine.stop()
        torch._dynamo.reset()
