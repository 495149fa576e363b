"""The serving engine in process (no HTTP) on SmolLM2-135M fp32, against transformers' own continuous
batching in the same run (issue 15's benchmark).

    .venv/bin/python -m pytest bench/serve/bench_engine.py -q     (about 12 minutes on 2 CPU cores)

Workload: prompts of 32-64 tokens of varied text (loadgen's), 32 completion tokens (greedy, ignore_eos).
- capacity: one decode step of 64 rows at 64 tokens of context, timed alone: 64 / its time is the
  engine's pure decode capacity (tokens/s);
- saturation: 192 requests submitted at once, tokens generated / wall time; ours with 0 (base), 1, 8
  and 64 distinct LoRA adapters (r=16, all 7 projections), 64 Zipf, 1,000 distinct adapters on disk
  through 64 slots (Zipf); the peer: transformers' `generate_batch` (PagedAttentionCache, its scheduler,
  the same 512-token step budget and 64 rows) serving the base model; 64 adapters again with the
  steps compiled (torch.compile, inductor), after a warm-up that compiles them;
- latency: Poisson arrivals at 70 % of the 64-adapter saturation rate for 30 s, TTFT p50/p99 against the
  TTFT of one prompt alone on an idle engine;
- prefix cache: a shared 512-token system prompt before each question, 8 adapters x 4 requests, at
  0.5 requests/s, with the prefix cache and without (the tokens must be identical);
- KV bytes per cached token against 2 x layers x kv_heads x head_dim x 4, and the bytes a decode step
  of 64 rows moves.
Results: bench/results/engine_smollm2.{md,json}.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from adapterhub import Backbone
from adapterhub.default_model import load_default
from adapterhub.serve.engine import Engine, Finished, Token
from adapterhub.serve.paged import KVPool
from adapterhub.serve.sampling import Sampling
from bench.serve import loadgen
from bench.serve.adapters import make_adapters, names
from bench.serve.decode_step import decode_step_seconds
from bench.serve.many_adapters import make_many
from bench.tables import MEDIANS, layout, machine

TABLE = "engine_smollm2"
RESULTS_DIR = Path(__file__).parent.parent / "results"
REQUESTS, MAX_TOKENS, ROWS, STEP_TOKENS = 192, 32, 64, 512
GREEDY = Sampling(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
RESULTS: dict = {"machine": machine(), "runs": {}}


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    workload = loadgen.Workload(rate=1.0, duration=n, adapters=1, seed=seed)
    planned = loadgen.plan(workload, ["x"], loadgen.tokenizer())
    tokenizer = loadgen.tokenizer()
    return [tokenizer(p.prompt)["input_ids"] for p in planned[:n]]


def zipf(n: int, count: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(n)]
    return rng.choices(range(n), weights, k=count)


class Run:
    """Requests submitted to an engine; each one's TTFT, end time and tokens."""

    def __init__(self, engine: Engine):
        self.engine, self.start = engine, time.perf_counter()
        self.first: dict[int, float] = {}
        self.submitted: dict[int, float] = {}
        self.tokens: dict[int, list[int]] = {}
        self.done = threading.Semaphore(0)

    def submit(self, k: int, adapter: str | None, prompt: list[int], sampling: Sampling = GREEDY) -> None:
        def on_event(event):
            if isinstance(event, Token) and k not in self.first:
                self.first[k] = time.perf_counter()
            if isinstance(event, Finished):
                self.first.setdefault(k, time.perf_counter())
                self.tokens[k] = list(event.token_ids)
                self.done.release()

        self.submitted[k] = time.perf_counter()
        self.engine.submit(adapter, prompt, sampling, on_event)

    def wait(self, n: int) -> float:
        for _ in range(n):
            assert self.done.acquire(timeout=900)
        return time.perf_counter() - self.start

    def ttft(self) -> list[float]:
        return sorted(self.first[k] - self.submitted[k] for k in self.first)


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(2)
    model, tokenizer = load_default()
    dirs = make_adapters()
    backbone = Backbone(model, max_adapters=ROWS, max_rank=16)
    engine = Engine(backbone, tokenizer, base_name="base", max_batch=ROWS, max_step_tokens=STEP_TOKENS).start()
    for name in names():
        engine.add_adapter(name, str(dirs[name]))
    RESULTS["kv_bytes_per_token"] = KVPool.bytes_per_token(model)
    yield engine
    engine.stop()
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{TABLE}.json").write_text(json.dumps(RESULTS, indent=1))


def saturate(engine: Engine, adapters: list[str | None]) -> dict:
    run, work = Run(engine), prompts(REQUESTS)
    for k, prompt in enumerate(work):
        run.submit(k, adapters[k % len(adapters)], prompt)
    wall = run.wait(len(work))
    return {"tokens_per_s": REQUESTS * MAX_TOKENS / wall, "wall_s": wall, "requests_per_s": REQUESTS / wall}


CASES = {  # name -> adapters the requests name, in turn
    "base": [None],
    "1 adapter": names()[:1],
    "8 adapters": names()[:8],
    "64 adapters": names(),
    "64 adapters, Zipf": [names()[k] for k in zipf(64, REQUESTS)],
}


@pytest.mark.parametrize("case", list(CASES))
def bench_saturation(setup, case):
    engine = setup
    adapters = CASES[case]
    residents = [None if a is None else engine._adapters[a].resident for a in adapters]
    capacity = ROWS / decode_step_seconds(engine, [residents[k % len(residents)] for k in range(ROWS)], 64, runs=5)
    result = saturate(engine, adapters) | {"capacity_tokens_per_s": capacity}
    result["efficiency"] = result["tokens_per_s"] / capacity
    RESULTS["runs"][case] = result
    MEDIANS[TABLE][case] = result


def bench_thousand_adapters_through_64_slots(setup):
    engine = setup
    many = make_many(1000)
    for name, path in many.items():
        engine.add_adapter(name, str(path))  # registered; each loads again when asked for after eviction
    order = list(many)
    adapters = [order[k] for k in zipf(len(order), REQUESTS, seed=2)]
    evictions = engine.backbone.evictions
    result = saturate(engine, adapters)
    result["evictions"] = engine.backbone.evictions - evictions
    result["distinct_adapters"] = len(set(adapters))
    for name in many:
        engine.remove_adapter(name, timeout=0)
    RESULTS["runs"]["1000 adapters, Zipf"] = result
    MEDIANS[TABLE]["1000 adapters, Zipf"] = result


def bench_ttft_at_70_percent(setup):
    engine = setup
    alone = Run(engine)
    alone.submit(0, names()[0], prompts(1, seed=5)[0], Sampling(max_tokens=1, temperature=0, ignore_eos=True))
    alone.wait(1)
    prefill_alone = alone.ttft()[0]
    rate = 0.7 * RESULTS["runs"]["64 adapters"]["requests_per_s"]
    rng, work = random.Random(3), prompts(400, seed=4)
    run, at, k = Run(engine), 0.0, 0
    while at < 30.0:
        time.sleep(max(0.0, run.start + at - time.perf_counter()))
        run.submit(k, names()[k % 64], work[k])
        k += 1
        at += rng.expovariate(rate)
    run.wait(k)
    ttft = run.ttft()
    result = {
        "rate": rate,
        "requests": k,
        "prefill_alone_s": prefill_alone,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
    }
    result["p99_over_alone"] = result["ttft_p99_s"] / prefill_alone
    RESULTS["runs"]["ttft at 70 %"] = result
    MEDIANS[TABLE]["ttft at 70 %"] = result


def bench_prefix_cache(setup):
    engine = setup
    tokenizer = loadgen.tokenizer()
    system = prompts(40, seed=6)
    system = [t for p in system for t in p][:512]  # a 512-token system prompt
    questions = prompts(32, seed=7)
    result = {}
    tokens = {}
    for cached in (True, False):
        engine.kv.prefix_cache = cached
        engine.kv.blocks.clear_cache()
        run, rng, at = Run(engine), random.Random(8), 0.0
        for k, question in enumerate(questions):
            time.sleep(max(0.0, run.start + at - time.perf_counter()))
            run.submit(k, names()[k % 8], system + question[:16])
            at += rng.expovariate(0.5)
        run.wait(len(questions))
        ttft = run.ttft()
        result["on" if cached else "off"] = {"ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99)}
        tokens[cached] = run.tokens
    engine.kv.prefix_cache = True
    result["identical_tokens"] = tokens[True] == tokens[False]
    result["p50_speedup"] = result["off"]["ttft_p50_s"] / result["on"]["ttft_p50_s"]
    RESULTS["runs"]["prefix cache"] = result
    MEDIANS[TABLE]["prefix cache"] = result
    del tokenizer


def bench_compiled_steps():
    """The engine with its steps through torch.compile (inductor, dynamic shapes) on its own copy of
    the model: the first steps' compile time, then decode capacity and 64-adapter saturation."""
    torch.set_num_threads(2)
    model, tokenizer = load_default()
    dirs = make_adapters()
    backbone = Backbone(model, max_adapters=ROWS, max_rank=16)
    engine = Engine(
        backbone, tokenizer, base_name="base", max_batch=ROWS, max_step_tokens=STEP_TOKENS, compile="inductor"
    ).start()
    try:
        for name in names():
            engine.add_adapter(name, str(dirs[name]))
        start = time.perf_counter()
        saturate(engine, names()[:4])  # compiles the graph of LoRA steps
        warm_up = time.perf_counter() - start
        residents = [engine._adapters[a].resident for a in names()]
        capacity = ROWS / decode_step_seconds(engine, residents, 64, runs=5, warmup=1)
        result = saturate(engine, names()) | {"capacity_tokens_per_s": capacity, "warm_up_s": warm_up}
        result["efficiency"] = result["tokens_per_s"] / capacity
    finally:
        engine.stop()
        torch._dynamo.reset()
    RESULTS["runs"]["64 adapters, compiled"] = result
    MEDIANS[TABLE]["64 adapters, compiled"] = result


def bench_transformers_continuous_batching():
    """The peer: transformers' continuous batching on the base model, same prompts, same budget."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    torch.set_num_threads(2)
    model, _ = load_default()
    model.set_attn_implementation("paged|sdpa")
    config = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    budget = ContinuousBatchingConfig(max_batch_tokens=STEP_TOKENS, max_requests_per_batch=ROWS)
    work = prompts(REQUESTS)
    model.generate_batch(inputs=work[:8], generation_config=config, continuous_batching_config=budget)  # warm up
    start = time.perf_counter()
    out = model.generate_batch(inputs=work, generation_config=config, continuous_batching_config=budget)
    wall = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in out.values())
    result = {"tokens_per_s": generated / wall, "wall_s": wall, "generated": generated}
    RESULTS["runs"]["transformers CB (base)"] = result
    MEDIANS[TABLE]["transformers CB (base)"] = result


@layout(TABLE)
def engine_table(rows: dict) -> str:
    runs = RESULTS["runs"]
    peer = runs.get("transformers CB (base)", {}).get("tokens_per_s")
    one = runs.get("1 adapter", {}).get("tokens_per_s")
    lines = [
        f"Saturation: {REQUESTS} requests at once, prompts 32-64 tokens, {MAX_TOKENS} tokens each; "
        f"{ROWS} rows, {STEP_TOKENS}-token steps.",
        "",
        "| case | tokens/s | decode capacity tokens/s | efficiency | / 1 adapter | / transformers CB |",
        "|---|---|---|---|---|---|",
    ]
    for case in [*CASES, "1000 adapters, Zipf", "64 adapters, compiled", "transformers CB (base)"]:
        r = runs.get(case)
        if r is None:
            continue
        capacity = r.get("capacity_tokens_per_s")
        cells = [f"{capacity:.1f}", f"{r['efficiency']:.2f}"] if capacity else ["-", "-"]
        ratios = [
            f"{r['tokens_per_s'] / one:.2f}x" if one else "-",
            f"{r['tokens_per_s'] / peer:.2f}x" if peer else "-",
        ]
        lines.append(f"| {case} | {r['tokens_per_s']:.1f} | " + " | ".join(cells + ratios) + " |")
    if "1000 adapters, Zipf" in runs:
        r = runs["1000 adapters, Zipf"]
        lines += ["", f"1000 adapters: {r['distinct_adapters']} distinct named, {r['evictions']} evictions."]
    if "64 adapters, compiled" in runs:
        r = runs["64 adapters, compiled"]
        lines += [
            "",
            f"Compiled: the steps through torch.compile (inductor, dynamic shapes, `--compile`); its first "
            f"{REQUESTS} requests (4 adapters, compiling the graph of LoRA steps) took {r['warm_up_s']:.0f} s.",
        ]
    if "ttft at 70 %" in runs:
        r = runs["ttft at 70 %"]
        lines += [
            "",
            f"TTFT at 70 % of the 64-adapter saturation rate ({r['rate']:.2f} requests/s, {r['requests']} requests): "
            f"p50 {r['ttft_p50_s']:.2f} s, p99 {r['ttft_p99_s']:.2f} s; one prompt alone {r['prefill_alone_s']:.3f} s "
            f"(p99 / alone {r['p99_over_alone']:.1f}x).",
        ]
    if "prefix cache" in runs:
        r = runs["prefix cache"]
        lines += [
            "",
            f"Prefix cache (512-token system prompt, 8 adapters x 4 requests, 0.5 requests/s): TTFT p50 "
            f"{r['on']['ttft_p50_s']:.2f} s with, {r['off']['ttft_p50_s']:.2f} s without ({r['p50_speedup']:.1f}x); "
            f"p99 {r['on']['ttft_p99_s']:.2f} s / {r['off']['ttft_p99_s']:.2f} s; tokens identical: "
            f"{r['identical_tokens']}.",
        ]
    per_token = RESULTS.get("kv_bytes_per_token")
    if per_token:
        weights = 134_515_008 * 4
        kv = ROWS * 64 * per_token
        lines += [
            "",
            f"KV cache: {per_token} bytes per cached token = 2 x 30 layers x 3 KV heads x 64 x 4 bytes (the floor). "
            f"A decode step of {ROWS} rows at 64 tokens reads the weights ({weights / 1e6:.0f} MB), each distinct "
            f"adapter (19.5 MB each at r=16 on all projections), and {kv / 1e6:.0f} MB of K/V, which it gathers "
            f"into a padded copy ({kv / 1e6:.0f} MB written, then read by SDPA).",
        ]
    return "\n".join(lines)
