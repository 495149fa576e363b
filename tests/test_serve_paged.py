"""The engine's paged KV cache and packed steps: every request's greedy tokens equal the model's own
generation alone, whatever joins, leaves, chunked prefill, preemption and prefix hits happen around it
(Llama with GQA, GPT-2); the prefix cache is shared only within one adapter version; packed routing
gives each token its own adapter."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading

import pytest
import torch
from peft import IA3Config, LoraConfig
from serving import Offline, make_model_dir, served_llama
from tiny_models import LLAMA_TARGETS, save_peft, tiny_gpt2, tiny_llama, tiny_tokenizer

from adapterhub import AdapterError, Backbone
from adapterhub.plugins import get_type
from adapterhub.serve.engine import Engine, Failed, Finished
from adapterhub.serve.errors import RequestError
from adapterhub.serve.kv_cache import BLOCK_SIZE, KVCache, KVState
from adapterhub.serve.paged import Chunk, KVPool, Step, use_paged_attention
from adapterhub.serve.sampling import Sampling
from adapterhub.serve.scheduler import plan_step

GREEDY = Sampling(max_tokens=14, temperature=0, ignore_eos=True)


def _run(engine: Engine, jobs: list[tuple[str | None, list[int]]], sampling: Sampling = GREEDY) -> list[list[int]]:
    """Submits every job at once; the generated token ids of each."""
    out: list[list[int]] = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def collect(k):
        def on_event(event):
            assert not isinstance(event, Failed), event
            if isinstance(event, Finished):
                out[k] = list(event.token_ids)
                done.release()

        return on_event

    for k, (name, prompt) in enumerate(jobs):
        engine.submit(name, prompt, sampling, collect(k))
    for _ in jobs:
        assert done.acquire(timeout=60)
    return out


def _alone(model, prompt: list[int], k: int) -> list[int]:
    """The model's k greedy tokens after `prompt`, one full forward each (no cache, end of sequence
    not suppressed: what the engine's ignore_eos does)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(k):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def _prompts(n: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(3, 98, (k,), generator=g).tolist() for k in lengths]


def _engine(
    model,
    blocks: int | None = None,
    *,
    max_adapters: int = 1,
    max_rank: int = 4,
    adapters: dict | None = None,
    **settings,
) -> Engine:
    """An engine (not started) on a bare `model`, its KV cache `blocks` blocks (None: the default),
    with `adapters` {name: directory} added."""
    kv_bytes = None if blocks is None else (blocks + 1) * KVPool.bytes_per_token(model) * BLOCK_SIZE  # + trash
    backbone = Backbone(model, max_adapters=max_adapters, max_rank=max_rank)
    engine = Engine(backbone, tiny_tokenizer(), base_name="t", kv_cache_bytes=kv_bytes, **settings)
    for name, source in (adapters or {}).items():
        engine.add_adapter(name, str(source))
    return engine


def _offline(adapters: dict, max_rank: int) -> Backbone:
    """tiny_llama in a Backbone with `adapters` {name: directory} loaded: what each request must equal."""
    offline = Backbone(tiny_llama(), max_adapters=len(adapters), max_rank=max_rank)
    for name, source in adapters.items():
        offline.load(source, name=name)
    return offline


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize(
    "max_batch, max_step_tokens, blocks",
    [(8, 512, 64), (3, 5, 64), (4, 8, 5)],  # all at once; chunked prefill; too few blocks: preemption
)
def test_each_request_equals_its_generation_alone(build, max_batch, max_step_tokens, blocks):
    model = build()
    reference = build()
    engine = _engine(model, blocks, max_batch=max_batch, max_step_tokens=max_step_tokens).start()
    try:
        prompts = _prompts(10)
        got = _run(engine, [(None, p) for p in prompts])
        assert got == [_alone(reference, p, GREEDY.max_tokens) for p in prompts]
        if blocks == 5:
            assert engine.metrics.preemptions._value.get() > 0
        assert engine.kv.blocks.used() == 0  # every row gave its blocks back
    finally:
        engine.stop()


def test_choices_fork_from_one_prompt_and_decode_their_own_way():
    model, reference = tiny_llama(), tiny_llama()
    engine = _engine(model, max_batch=4).start()
    try:
        prompt = _prompts(1, seed=9)[0] + [5] * 20  # a partial last block, copied per choice
        greedy = Sampling(max_tokens=10, temperature=0, ignore_eos=True, n=3)
        texts = []
        done = threading.Semaphore(0)

        def on_event(event):
            if isinstance(event, Finished):
                texts.append(list(event.token_ids))
                done.release()

        engine.submit(None, prompt, greedy, on_event)
        for _ in range(3):
            assert done.acquire(timeout=60)
        assert texts == [_alone(reference, prompt, 10)] * 3
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("paged"))


def test_prefix_cache_is_shared_only_within_one_adapter_version(dirs):
    offline = Offline(dirs)
    engine = Engine(Backbone(served_llama(), max_adapters=4, max_rank=8), tiny_tokenizer(), base_name="tiny")
    engine.start()
    try:
        for name in ("a0", "a1"):
            engine.add_adapter(name, str(dirs[name]))
        system = "You are a careful assistant. Answer: "  # 37 characters: two full blocks
        sampling = Sampling(max_tokens=8, temperature=0, ignore_eos=True)
        tokenizer = offline.tokenizer

        def ask(name, suffix):
            before = engine.kv.blocks.hits
            (tokens,) = _run(engine, [(name, offline.ids(system + suffix))], sampling)
            return tokenizer.decode(tokens), engine.kv.blocks.hits - before

        assert ask("a0", "hi") == (offline.complete("a0", system + "hi", 8, ignore_eos=True), 0)
        assert ask("a0", "yo") == (offline.complete("a0", system + "yo", 8, ignore_eos=True), 2)  # same version
        assert ask("a1", "yo")[1] == 0  # another adapter
        assert ask(None, "yo")[1] == 0  # the base model
        assert ask(None, "hi")[1] == 2
        engine.add_adapter("a0", str(dirs["a3"]))  # same name, new weights: a new version
        assert ask("a0", "hi") == (offline.complete("a3", system + "hi", 8, ignore_eos=True), 0)
        assert ask("a0", "yo")[1] == 2
        engine.add_adapter("twin", str(dirs["a3"]))  # the same files under another name: the same digest
        assert ask("twin", "yo") == (offline.complete("a3", system + "yo", 8, ignore_eos=True), 2)
        metrics = engine.metrics.render().decode()
        for line in (
            "adapterhub_prefix_cache_hits_total 8.0",
            f"adapterhub_kv_blocks {float(engine.kv.blocks.count)}",
            "adapterhub_kv_blocks_used 0.0",
            "adapterhub_prefix_cache_tokens_total 128.0",
            "adapterhub_preemptions_total 0.0",
            "adapterhub_step_tokens_count",
        ):
            assert line in metrics, line
    finally:
        engine.stop()


def test_a_request_larger_than_the_cache_is_refused_and_one_that_fits_alone_runs():
    engine = _engine(tiny_llama(), 2, max_batch=4)
    with pytest.raises(RequestError, match="KV cache of 32 tokens"):
        engine.submit(None, [5] * 30, Sampling(max_tokens=3), lambda e: None)
    engine.start()
    try:
        prompts = [[7] * 20, [8] * 20, [9] * 20]  # each fits alone, not together
        assert _run(engine, [(None, p) for p in prompts], Sampling(max_tokens=12, temperature=0, ignore_eos=True)) == [
            _alone(tiny_llama(), p, 12) for p in prompts
        ]
    finally:
        engine.stop()


def test_the_default_kv_cache_holds_max_batch_full_contexts():
    engine = _engine(tiny_llama(), max_batch=3)  # the default budget, besides the trash block
    assert engine.kv.blocks.count * BLOCK_SIZE == 3 * engine.context


def test_kv_bytes_per_token_are_the_floor():
    model = tiny_llama()  # 2 layers, 2 KV heads of 8 dims, fp32
    cache = KVCache(model, 10 * 16 * 256)
    assert KVPool.bytes_per_token(model) == 2 * 2 * 2 * 8 * 4
    assert sum(t.numel() * t.element_size() for t in cache.pool.keys + cache.pool.values) == 10 * 16 * 256


def _loaded(tmp_path):
    model = tiny_llama()
    bb = Backbone(model, max_adapters=4, max_rank=8)
    bb.load(save_peft(tiny_llama, tmp_path / "lora", 1, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)))
    bb.load(
        save_peft(
            tiny_llama,
            tmp_path / "ia3",
            2,
            IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        ),
        name="ia3",
    )
    bottleneck, g = get_type("bottleneck"), torch.Generator().manual_seed(7)
    adapter = bottleneck.init(model, {"config": "seq_bn"})
    for parts in adapter.modules.values():
        for key, tensor in parts.items():
            if "adapter_" in key:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
    bottleneck.write(adapter, tmp_path / "seq_bn")
    bb.load(tmp_path / "seq_bn", name="seq_bn")
    return model, bb


def test_packed_routing_gives_each_token_its_own_adapter(tmp_path):
    model, bb = _loaded(tmp_path)
    use_paged_attention(model)
    names = ["lora", None, "ia3", "seq_bn", "lora"]
    prompts = _prompts(len(names), seed=5)
    pool = KVPool(model, 64, BLOCK_SIZE)
    chunks, start = [], 0
    for p in prompts:
        blocks = list(range(start, start + -(-len(p) // BLOCK_SIZE)))
        chunks.append(Chunk(blocks, 0, len(p)))
        start += len(blocks)
    step = Step(pool, chunks, torch.device("cpu"))
    ids = torch.tensor([[t for p in prompts for t in p]])
    positions = torch.tensor([[i for p in prompts for i in range(len(p))]])
    assert torch.equal(step.positions, positions[0])
    with bb.use(names, lengths=[len(p) for p in prompts]), torch.no_grad():
        packed = model(input_ids=ids, **step.inputs()).logits[0]
    offset = 0
    for name, p in zip(names, prompts):
        with bb.use(name), torch.no_grad():
            alone = model(input_ids=torch.tensor([p])).logits[0]
        torch.testing.assert_close(packed[offset : offset + len(p)], alone, rtol=1e-5, atol=1e-5, msg=name)
        offset += len(p)


def test_a_model_whose_layers_drop_the_step_is_refused():
    """The step reaches attention as a keyword argument; a layer that does not pass it on would attend
    without the cache, so the start-up probe refuses the model."""
    model = tiny_llama()
    attention = model.model.layers[1].self_attn
    forward = attention.forward
    attention.forward = lambda *args, paged=None, **kwargs: forward(*args, **kwargs)
    with pytest.raises(TypeError, match="gets the forward's keyword arguments"):
        use_paged_attention(model)


def test_packed_routing_refuses_prompt_tuning_and_bad_lengths(tmp_path):
    from peft import PromptTuningConfig

    model = tiny_llama()
    bb = Backbone(model, max_adapters=2, max_rank=8)
    bb.load(
        save_peft(tiny_llama, tmp_path / "pt", 1, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        name="pt",
    )
    refused = "'pt' is a prompt_tuning adapter, which cannot run in a packed batch"
    with pytest.raises(AdapterError, match=refused), bb.use(["pt", None], lengths=[3, 4]):
        pass
    with pytest.raises(AdapterError, match="one token count >= 0 per name"), bb.use([None, None], lengths=[3]):
        pass


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch", "16", "--max-step-tokens", "8"], "max_step_tokens (8) must be at least max_batch (16)"),
        (["--kv-cache-bytes", "12 parsecs"], "expected a size such as 4GiB"),
        (["--kv-cache-bytes", "100B"], "holds fewer than 2 blocks of 16 tokens"),
    ],
)
def test_serve_refuses_bad_engine_settings(dirs, flags, message):
    base = dirs["a0"].parent.parent / "base"
    done = subprocess.run(
        [sys.executable, "-m", "adapterhub.cli", "serve", "--base", str(base), "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_prompt_tuning_is_served_in_mixed_batches_as_offline(tmp_path):
    """Prompt-tuning rows (their virtual tokens placed before the prompt, across chunk boundaries) share
    packed steps with LoRA and base rows, and each equals Backbone.use + generate() offline."""
    from peft import PromptTuningConfig

    sources = {
        "p4": save_peft(
            tiny_llama, tmp_path / "p4", 1, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        ),
        "p19": save_peft(
            tiny_llama, tmp_path / "p19", 2, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=19)
        ),
        "lora": save_peft(
            tiny_llama, tmp_path / "lora", 3, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
        ),
    }
    offline = _offline(sources, max_rank=32)
    engine = _engine(tiny_llama(), max_adapters=3, max_rank=32, adapters=sources, max_batch=4, max_step_tokens=6)
    engine.start()
    try:
        jobs = [(name, p) for name, p in zip(["p4", "p19", None, "lora", "p19", "p4"], _prompts(6, seed=11))]
        got = _run(engine, jobs)
        for (name, prompt), tokens in zip(jobs, got):
            with offline.use(name):
                assert tokens == _alone(offline.model, prompt, GREEDY.max_tokens), name
        before = engine.kv.blocks.hits
        again = _run(engine, [jobs[1]])  # 19 virtual tokens + its prompt: a full block to reuse
        assert again == [got[1]] and engine.kv.blocks.hits > before
        with pytest.raises(RequestError, match="after 19 virtual tokens"):
            engine.submit("p19", [5] * 40, Sampling(max_tokens=10), lambda e: None)
    finally:
        engine.stop()


def _stalled(prompts: list[list[int]], blocks: int, cached: list[int] | None = None):
    """An engine (not started) whose admitted rows each computed two blocks of their prompt, with
    `cached` published in the prefix cache first."""
    engine = _engine(tiny_llama(), blocks, max_batch=4, max_step_tokens=64)
    if cached:
        warm = KVState("", cached + [40])
        assert engine.kv.grow(warm, len(warm.tokens))
        warm.computed = len(warm.tokens)
        engine.kv.publish(warm)
        engine.kv.free(warm)
    for prompt in prompts:
        engine.submit(None, prompt, Sampling(max_tokens=4), lambda e: None)
    with engine._lock:
        admitted = engine._admit()
    engine._join(admitted)
    return engine


def test_rows_that_all_wait_for_blocks_mid_prompt_are_unblocked_by_the_youngest():
    """Every block held by rows mid-prompt, none decoding: the plan must not be empty (the engine
    would spin); the youngest row gives its blocks back."""
    engine = _stalled([[7] * 40, [8] * 40], blocks=4)
    old, young = engine._rows
    for row in (old, young):  # each holds two full blocks of its prompt, none is left
        assert engine.kv.grow(row.kv, 32)
        row.kv.computed = 32
    plan = plan_step(engine._rows, engine.kv, engine.max_step_tokens, engine._preempt)
    assert [(row is old, count) for row, count in plan] == [(True, 8)]
    assert young.kv.blocks == [] and young.kv.computed == 0
    assert engine.metrics.preemptions._value.get() == 1


def test_a_stalled_step_whose_youngest_row_holds_only_shared_blocks_preempts_one_that_frees_some():
    """The youngest row holds only a cached prefix block shared with older rows: preempting it frees
    nothing and it would take the same block back (found by review: unbounded recursion); the row
    that owns blocks gives them back instead."""
    shared = list(range(3, 19))  # one full block, cached by an earlier request
    engine = _stalled([shared + [50] * 24, shared + [60] * 24, shared + [70] * 6], blocks=3, cached=shared)
    first, second, third = engine._rows
    for row in (first, second):
        engine.kv.reuse_prefix(row.kv)
        assert engine.kv.grow(row.kv, 16)
        row.kv.computed = 32
    engine.kv.reuse_prefix(third.kv)  # shares the prefix block; every block is now held
    assert engine.kv.blocks.available() == 0
    plan = plan_step(engine._rows, engine.kv, engine.max_step_tokens, engine._preempt)
    assert plan and engine.metrics.preemptions._value.get() <= 2
    assert engine.kv.blocks.refs[first.kv.blocks[0]] >= 1  # the shared prefix stays held


def test_an_adapter_on_the_output_layer_is_served_beside_others(tmp_path):
    """LoRA on lm_head routes per token too: once the output layer has slots, steps compute it at every
    position (found by review: with logits_to_keep the layer saw fewer tokens than its route, failing
    the batch, also for other LoRA rows and after the head adapter was removed)."""
    lora = get_type("lora")
    g = torch.Generator().manual_seed(3)
    for name, targets in (("head", ["q_proj", "lm_head"]), ("plain", ["q_proj"])):
        adapter = lora.init(tiny_llama(), {"target_modules": targets, "r": 4})
        for parts in adapter.modules.values():
            parts["B"].copy_(torch.randn(parts["B"].shape, generator=g))
        lora.write(adapter, tmp_path / name)
    sources = {name: tmp_path / name for name in ("head", "plain")}
    offline = _offline(sources, max_rank=8)
    engine = _engine(tiny_llama(), max_adapters=3, max_rank=8, adapters=sources, max_step_tokens=64)
    engine.start()
    try:
        names = ["head", None, "plain", "head", "plain"]
        jobs = list(zip(names, _prompts(5, seed=13)))
        for (name, prompt), tokens in zip(jobs, _run(engine, jobs)):
            with offline.use(name):
                assert tokens == _alone(offline.model, prompt, GREEDY.max_tokens), name
        engine.remove_adapter("head")
        (tokens,) = _run(engine, [jobs[2]])  # "plain" alone, the output layer's slots still attached
        with offline.use("plain"):
            assert tokens == _alone(offline.model, jobs[2][1], GREEDY.max_tokens)
    finally:
        engine.stop()


def test_n_choices_count_against_max_batch_before_they_fork():
    """Three n=2 requests with max_batch 3: never more than 3 rows in flight (found by review: the
    choices still to fork were not counted at admission)."""
    engine = _engine(tiny_llama(), max_batch=3, max_step_tokens=4)
    peak = []
    original = engine._step

    def step():
        original()
        peak.append(len(engine._rows))

    engine._step = step
    engine.start()
    try:
        sampling = Sampling(max_tokens=20, temperature=0, ignore_eos=True, n=2)
        got = _run(engine, [(None, [5 + k] * 20) for k in range(3)], sampling)  # prompts take several steps
        assert len(got) == 3 and max(peak) <= 3
    finally:
        engine.stop()


def test_models_the_paged_attention_cannot_serve_are_refused_at_start():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def gemma2(**overrides):
        config = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        return Gemma2ForCausalLM(Gemma2Config(num_key_value_heads=2, head_dim=8, **config, **overrides))

    with pytest.raises(TypeError, match="sliding_attention"):
        use_paged_attention(gemma2(attn_logit_softcapping=None))
    with pytest.raises(TypeError, match="soft-cap"):  # every layer full attention, logits soft-capped
        use_paged_attention(gemma2(layer_types=["full_attention"] * 2, attn_logit_softcapping=50.0))


def test_a_type_that_does_not_declare_packed_is_refused_by_the_server_by_name(tmp_path):
    """A plugin type written before packed steps (AdapterType.packed left False, no virtual tokens)
    is refused when added, instead of failing every batch it would join."""
    from adapterhub import hookimpl
    from adapterhub.plugins import Registry
    from adapterhub.types.lora import LoraType

    class OldLora(LoraType):
        name = "old_lora"
        packed = False

        def read(self, directory, *, allow_pickle=False):
            return dataclasses.replace(super().read(directory, allow_pickle=allow_pickle), type=self.name)

    types = Registry(load_entry_points=False)  # it reads PEFT's LORA directories in place of the built-in
    types.register(type("Plugin", (), {"adapter_types": hookimpl(lambda self: [OldLora()])})())
    source = save_peft(tiny_llama, tmp_path / "old", 1, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    backbone = Backbone(tiny_llama(), max_adapters=2, max_rank=8, preallocate=(), types=types)
    engine = Engine(backbone, tiny_tokenizer(), base_name="t")
    with pytest.raises(AdapterError, match="old_lora adapter neither runs in packed batches nor gives virtual tokens"):
        engine.add_adapter("old", str(source))
    assert backbone.names == [] and engine.adapters() == {}
