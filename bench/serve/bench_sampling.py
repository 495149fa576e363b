"""What the OpenAI sampling fields cost per generated token, at batch 64 on SmolLM2-135M fp32, as a
ratio of plain decoding in the same run (issue 17's benchmark).

    .venv/bin/python -m pytest bench/serve/bench_sampling.py -q     (about 6 minutes on 2 CPU cores)

Each case submits 64 requests at once to an in-process Engine (64 rows, 8 LoRA adapters in turn) with
48 completion tokens each, and times the decode phase: from the moment every row has its first token
to the last row's end, per generated token. Cases:
- plain: temperature 1, top_p 0.9 (the peer every other case is divided by), and greedy;
- penalties + logprobs: frequency 0.5, presence 0.5, repetition 1.1, logit_bias on 20 tokens, top_k 50,
  min_p 0.05, 5 top logprobs per token;
- json_schema: every row constrained to an array of at least 100 integers (so no row ends early);
  grammar masks filled for 64 rows per step;
- mixed: half the rows json_schema, half penalties + logprobs.
Goals (issue 17): <= 1.10x for penalties + logprobs, <= 1.25x for json_schema.
Results: bench/results/sampling_smollm2.{md,json}.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adapterhub import Backbone
from adapterhub.default_model import load_default
from adapterhub.serve.engine import Engine, Failed, Finished, Token
from adapterhub.serve.grammar import Constraint
from adapterhub.serve.sampling import Sampling
from bench.serve.adapters import make_adapters, names
from bench.serve.bench_engine import prompts
from bench.tables import machine

TABLE = "sampling_smollm2"
RESULTS_DIR = Path(__file__).parent.parent / "results"
ROWS, MAX_TOKENS, REPEATS = 64, 48, 3
PLAIN = Sampling(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=0, ignore_eos=True)
PENALTIES = replace(
    PLAIN,
    frequency_penalty=0.5,
    presence_penalty=0.5,
    repetition_penalty=1.1,
    logit_bias=tuple((t, -5.0) for t in range(1000, 1020)),
    top_k=50,
    min_p=0.05,
    logprobs=5,
)
SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 100}
RESULTS: dict = {"machine": machine(), "rows": ROWS, "max_tokens": MAX_TOKENS, "runs": {}}


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(2)
    model, tokenizer = load_default()
    dirs = make_adapters()
    backbone = Backbone(model, max_adapters=16, max_rank=16)
    engine = Engine(backbone, tokenizer, base_name="base", max_batch=ROWS, max_step_tokens=512).start()
    for name in names()[:8]:
        engine.add_adapter(name, str(dirs[name]))
    yield engine
    engine.stop()
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{TABLE}.json").write_text(json.dumps(RESULTS, indent=1))
    (RESULTS_DIR / f"{TABLE}.md").write_text(table(RESULTS))


def decode_seconds_per_token(engine: Engine, samplings: list[Sampling]) -> float:
    """Submits one request per sampling at once; the decode phase's seconds per generated token."""
    work, adapters = prompts(2 * len(samplings))[: len(samplings)], names()[:8]  # loadgen's plan may hold fewer
    assert len(work) == len(samplings)
    first: dict[int, float] = {}
    ends: list[float] = []
    tokens = [0]
    failures: list[Failed] = []
    done = threading.Semaphore(0)

    def on_event(k: int):
        def receive(event):
            if isinstance(event, Token | Finished) and k not in first:
                first[k] = time.perf_counter()
            if isinstance(event, Finished):
                ends.append(time.perf_counter())
                tokens[0] += event.tokens - 1  # the first token is the prefill's
                done.release()
            if isinstance(event, Failed):
                failures.append(event)
                done.release()

        return receive

    for k, (prompt, sampling) in enumerate(zip(work, samplings)):
        engine.submit(adapters[k % len(adapters)], prompt, sampling, on_event(k))
    for _ in samplings:
        assert done.acquire(timeout=900)
    assert not failures, failures[0].message
    return (max(ends) - max(first.values())) / tokens[0]


def grammar_sampling(engine: Engine) -> Sampling:
    compiled = engine.grammars.compile(Constraint("json_schema", json.dumps(SCHEMA)))
    return replace(PLAIN, grammar=compiled)


CASES = {
    "plain (temperature 1, top_p 0.9)": lambda e: [PLAIN] * ROWS,
    "greedy": lambda e: [replace(PLAIN, temperature=0)] * ROWS,
    "penalties + logprobs": lambda e: [PENALTIES] * ROWS,
    "json_schema": lambda e: [grammar_sampling(e)] * ROWS,
    "mixed: 32 json_schema + 32 penalties + logprobs": lambda e: [grammar_sampling(e), PENALTIES] * (ROWS // 2),
}


def bench_sampling_cost(engine):
    decode_seconds_per_token(engine, [PLAIN] * ROWS)  # warm-up
    for _ in range(REPEATS):  # cases interleaved, so drift hits each alike
        for case, samplings in CASES.items():
            seconds = decode_seconds_per_token(engine, samplings(engine))
            RESULTS["runs"].setdefault(case, []).append(seconds)
    plain = sorted(RESULTS["runs"][next(iter(CASES))])[REPEATS // 2]
    RESULTS["median_ms_per_token"] = {c: sorted(v)[REPEATS // 2] * 1e3 for c, v in RESULTS["runs"].items()}
    RESULTS["ratio_to_plain"] = {c: ms / 1e3 / plain for c, ms in RESULTS["median_ms_per_token"].items()}


def table(results: dict) -> str:
    lines = [
        f"## {TABLE}",
        "",
        f"Machine: {results['machine']}. {results['rows']} rows, {results['max_tokens']} tokens each, "
        f"median of {REPEATS} runs; decode phase only.",
        "",
        "| case | ms per token | ratio to plain |",
        "|---|---|---|",
    ]
    for case, ms in results.get("median_ms_per_token", {}).items():
        lines.append(f"| {case} | {ms:.3f} | {results['ratio_to_plain'][case]:.3f} |")
    return "\n".join(lines) + "\n"
