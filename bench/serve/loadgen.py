"""An open-loop load generator for OpenAI-compatible servers, on loopback.

Requests arrive as a Poisson process at a fixed offered rate, whatever the server does (open loop:
a slow server gets a growing queue, not fewer requests). Every request streams a completion of
exactly `max_tokens` tokens (greedy, vLLM's `ignore_eos`) for a prompt of 32-64 tokens of varied
text, naming one of N adapters drawn from a uniform or a Zipf popularity. The arrival times and
prompts depend only on the seed and the rate, so every configuration gets the same requests; the
adapters depend on the seed, N and the popularity, so two servers given the same N get the same
sequence.

A run sends for `duration` seconds, then waits at most `grace` seconds more; requests unfinished by
then are cancelled (their connection is closed, which the server sees as a client going away) and
count as unfinished: their tokens are not counted, and their latency is only known to be at least
their age at the end (the latency columns then say ">=").

    python -m bench.serve.loadgen http://127.0.0.1:8000/v1 --rate 5 --adapters 64 --popularity zipf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

MAX_TOKENS = 32  # completion tokens of every request
PROMPT_TOKENS = (32, 64)  # prompt length, drawn uniformly
ZIPF_S = 1.0  # popularity of the k-th adapter ~ 1/k^s: with 64 adapters the first gets 21 %, the top 8 get 57 %
TEXT = Path(__file__).parent.parent / "transfer" / "data" / "test.jsonl"  # 1000+ short varied sentences


@dataclass(frozen=True)
class Workload:
    rate: float  # requests per second offered
    duration: float  # seconds of arrivals
    adapters: int  # distinct adapters the requests name (the first N of `names`)
    popularity: str = "uniform"  # or "zipf"
    max_tokens: int = MAX_TOKENS
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS
    seed: int = 0


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the start
    adapter: str
    prompt: str
    prompt_tokens: int


def plan(workload: Workload, names: list[str], tokenizer) -> list[Planned]:
    """The requests of one run, in arrival order."""
    if workload.adapters > len(names):
        raise ValueError(f"the workload names {workload.adapters} adapters but only {len(names)} are given")
    arrivals, texts = random.Random(workload.seed), random.Random(workload.seed + 1)
    picks = random.Random(workload.seed + 2)
    sentences = [json.loads(line)["text"] for line in TEXT.read_text().splitlines() if line.strip()]
    chosen = names[: workload.adapters]
    if workload.popularity == "uniform":
        weights = [1.0] * len(chosen)
    elif workload.popularity == "zipf":
        weights = [1 / (k + 1) ** ZIPF_S for k in range(len(chosen))]
    else:
        raise ValueError(f"popularity {workload.popularity!r}: use 'uniform' or 'zipf'")
    planned, t = [], arrivals.expovariate(workload.rate)
    while t < workload.duration:
        low, high = workload.prompt_tokens
        prompt, count = _prompt(texts, sentences, texts.randint(low, high), high, tokenizer)
        planned.append(Planned(t, picks.choices(chosen, weights)[0], prompt, count))
        t += arrivals.expovariate(workload.rate)
    return planned


def _prompt(rng: random.Random, sentences: list[str], target: int, most: int, tokenizer) -> tuple[str, int]:
    """Sentences appended until `target` tokens, then words cut until at most `most`: (text, tokens)."""
    words: list[str] = []
    while len(tokenizer(" ".join(words))["input_ids"]) < target:
        words += rng.choice(sentences).capitalize().split()
    while len(tokenizer(" ".join(words))["input_ids"]) > most:
        words.pop()
    text = " ".join(words)
    return text, len(tokenizer(text)["input_ids"])


@dataclass
class Outcome:
    sent: float  # perf_counter at sending
    adapter: str
    first: float | None = None  # first text received
    done: float | None = None  # last event received, usage included
    tokens: int = 0  # completion tokens (the usage the server reports)
    error: str | None = None
    age: float | None = None  # unfinished: seconds from sending to the end of the run


@dataclass
class Summary:
    sent: int
    completed: int
    unfinished: int
    failed: int
    completion_tokens: int
    wall_s: float  # first send to last completion
    tokens_per_s: float
    offered_tokens_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    lower_bound: bool  # some requests were unfinished: latencies count them at their age, so are lower bounds
    errors: list[str] = field(default_factory=list)


async def run(base_url: str, workload: Workload, planned: list[Planned], *, grace: float) -> list[Outcome]:
    """Sends `planned` on schedule; returns one Outcome per request once all finished or `grace` ran out."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(None)) as client:
        outcomes: list[Outcome] = []
        tasks = []
        start = time.perf_counter()
        for p in planned:
            delay = start + p.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            outcome = Outcome(time.perf_counter(), p.adapter)
            outcomes.append(outcome)
            tasks.append(asyncio.create_task(_complete(client, workload, p, outcome)))
        deadline = start + workload.duration + grace - time.perf_counter()
        _, pending = await asyncio.wait(tasks, timeout=max(deadline, 0.0)) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        end = time.perf_counter()
        for outcome in outcomes:
            if outcome.done is None and outcome.error is None:
                outcome.error = "unfinished"
                outcome.age = end - outcome.sent
        return outcomes


async def _complete(client: httpx.AsyncClient, workload: Workload, p: Planned, outcome: Outcome) -> None:
    body = {
        "model": p.adapter,
        "prompt": p.prompt,
        "max_tokens": workload.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", "/completions", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    outcome.error = event["error"]["message"]
                    return
                if outcome.first is None and any(c.get("text") for c in event["choices"]):
                    outcome.first = time.perf_counter()
                if event.get("usage"):
                    outcome.tokens = event["usage"]["completion_tokens"]
                    outcome.done = time.perf_counter()
    except httpx.HTTPError as error:
        outcome.error = f"{type(error).__name__}: {error}"


def summarize(workload: Workload, outcomes: list[Outcome]) -> Summary:
    done = [o for o in outcomes if o.done is not None]
    unfinished = [o for o in outcomes if o.error == "unfinished"]
    failed = [o for o in outcomes if o.error not in (None, "unfinished")]
    tokens = sum(o.tokens for o in done)
    wall = max(o.done for o in done) - min(o.sent for o in outcomes) if done else math.nan
    # unfinished requests enter the percentiles at their age when the run ended (a lower bound)
    latency = [o.done - o.sent for o in done] + [o.age for o in unfinished]
    ttft = [o.first - o.sent for o in done if o.first is not None] + [
        o.first - o.sent if o.first is not None else o.age for o in unfinished
    ]
    return Summary(
        sent=len(outcomes),
        completed=len(done),
        unfinished=len(unfinished),
        failed=len(failed),
        completion_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if done else 0.0,
        offered_tokens_per_s=workload.rate * workload.max_tokens,
        latency_p50_s=percentile(latency, 50),
        latency_p99_s=percentile(latency, 99),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        lower_bound=bool(unfinished),
        errors=sorted({o.error for o in failed})[:5],
    )


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = math.floor(k), math.ceil(k)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def measure(base_url: str, workload: Workload, planned: list[Planned], *, grace: float) -> Summary:
    return summarize(workload, asyncio.run(run(base_url, workload, planned, grace=grace)))


def tokenizer():
    """SmolLM2's tokenizer (the embedded default's), to size the prompts."""
    from transformers import AutoTokenizer

    from adapterhub.default_model import GGUF_FILE, default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--rate", type=float, required=True, help="requests per second offered")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds to wait after the last arrival")
    parser.add_argument("--adapters", type=int, default=1)
    parser.add_argument("--popularity", default="uniform", choices=["uniform", "zipf"])
    parser.add_argument("--max-tokens", dest="max_tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .adapters import names

    workload = Workload(args.rate, args.duration, args.adapters, args.popularity, args.max_tokens, seed=args.seed)
    planned = plan(workload, names(), tokenizer())
    print(json.dumps(asdict(measure(args.url, workload, planned, grace=args.grace)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
