"""Memory under churn (issue 15): the engine in process for DURATION seconds (10 minutes by default)
of mixed traffic with every kind of turnover, sampling its resident memory. Memory must stay bounded:
no growth after warm-up beyond noise, no KV block held once the traffic stops.

    ADAPTERHUB_BENCH_CHURN_SECONDS=600 .venv/bin/python -m pytest bench/serve/bench_churn.py -q

Traffic: SmolLM2-135M, 64 slots, 48 rows, a 64 MiB KV cache (so preemption happens), 300 adapter
names over 300 distinct files (bench/serve/many_adapters.py) with Zipf popularity plus base requests;
requests with random prompts of 8-200 tokens, 4-48 tokens, n of 1-3, a shared system prompt on half
of them (prefix cache), a tenth cancelled mid-flight; every 5 s one adapter replaced by other weights
and one deleted and added again. Results: bench/results/churn_smollm2.md.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import torch

from adapterhub import Backbone
from adapterhub.default_model import load_default
from adapterhub.errors import NoFreeSlot
from adapterhub.serve.engine import Engine, Failed, Finished
from adapterhub.serve.sampling import Sampling
from bench.serve.many_adapters import make_many

DURATION = float(os.environ.get("ADAPTERHUB_BENCH_CHURN_SECONDS", 600))
RESULTS = Path(__file__).parent.parent / "results" / "churn_smollm2.md"


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_memory_stays_bounded_under_churn():
    torch.set_num_threads(2)
    model, tokenizer = load_default()
    engine = Engine(
        Backbone(model, max_adapters=64, max_rank=16),
        tokenizer,
        base_name="base",
        max_batch=48,
        max_step_tokens=256,
        kv_cache_bytes=64 << 20,
    ).start()
    files = list(make_many(300).values())
    names = [f"n{k:03d}" for k in range(len(files))]
    for name, path in zip(names, files):
        engine.add_adapter(name, str(path))
    rng = random.Random(0)
    weights = [1 / (k + 1) for k in range(len(names))]
    system = [rng.randrange(1000, 20000) for _ in range(96)]
    outcome = {"finished": 0, "failed": 0, "cancelled": 0, "sent": 0, "churned": 0, "no_slot": 0}
    in_flight = threading.Semaphore(96)  # at most 96 requests queued or running
    lock = threading.Lock()

    def tracked(n: int):
        """on_event for a request of n choices, and its cancel: each releases its place once."""
        state = {"left": n, "open": True}

        def release() -> None:
            with lock:
                if not state["open"]:
                    return
                state["open"] = False
            in_flight.release()

        def handle(event):
            if isinstance(event, Failed | Finished):
                with lock:
                    outcome["failed" if isinstance(event, Failed) else "finished"] += 1
                    state["left"] -= 1
                    last = isinstance(event, Failed) or state["left"] == 0
                if last:
                    release()

        return handle, release

    samples, start, churned = [], time.perf_counter(), time.perf_counter()
    while time.perf_counter() - start < DURATION:
        if not in_flight.acquire(timeout=1.0):
            continue
        name = None if rng.random() < 0.15 else rng.choices(names, weights)[0]
        prompt = [rng.randrange(1000, 20000) for _ in range(rng.randint(8, 200))]
        if rng.random() < 0.5:
            prompt = system + prompt[:64]
        sampling = Sampling(max_tokens=rng.randint(4, 48), temperature=rng.choice([0, 0.8]), n=rng.randint(1, 3))
        handle, release = tracked(sampling.n)
        try:
            request = engine.submit(name, prompt, sampling, handle)
        except Exception:  # the name was deleted a moment ago
            release()
            continue
        outcome["sent"] += 1
        if rng.random() < 0.1:  # a client going away: its rows leave without further events
            threading.Timer(rng.uniform(0.1, 3.0), lambda r=request, done=release: (r.cancel(), done())).start()
            outcome["cancelled"] += 1
        now = time.perf_counter()
        if now - churned > 5.0:
            churned = now
            try:
                engine.add_adapter(rng.choice(names), str(rng.choice(files)))  # replaced: new weights, same name
                gone = rng.choice(names)
                engine.remove_adapter(gone, timeout=0)
                engine.add_adapter(gone, str(rng.choice(files)))
                outcome["churned"] += 1
            except NoFreeSlot:  # every slot pinned by requests in flight: try again next time
                outcome["no_slot"] += 1
        if not samples or now - samples[-1][0] - start >= 10.0:
            samples.append((now - start, rss_mb(), engine.kv.blocks.used(), len(engine.backbone.host_cache)))
    for _ in range(96):  # drain
        assert in_flight.acquire(timeout=300)
    time.sleep(1.5)
    idle_blocks = engine.kv.blocks.used()
    engine.stop()
    warm = [rss for t, rss, _, _ in samples if t >= 60] or [samples[-1][1]]
    lines = [
        "## churn_smollm2",
        "",
        f"{DURATION:.0f} s of churn: {outcome['sent']} requests sent ({outcome['finished']} choices finished, "
        f"{outcome['failed']} failed, {outcome['cancelled']} cancelled), 300 adapters through 64 slots, "
        f"{engine.backbone.evictions} evictions, {engine.metrics.preemptions._value.get():.0f} preemptions, "
        f"prefix hits {engine.kv.blocks.hits} of {engine.kv.blocks.lookups} lookups; {outcome['churned']} "
        f"replace + delete + add rounds ({outcome['no_slot']} put off: every slot pinned).",
        "",
        f"RSS after 1 min {warm[0]:.0f} MiB, at the end {warm[-1]:.0f} MiB, max {max(warm):.0f} MiB; "
        f"KV blocks held once the traffic stopped: {idle_blocks}.",
        "",
        "| t s | RSS MiB | KV blocks used | host cache entries |",
        "|---|---|---|---|",
        *[f"| {t:.0f} | {rss:.0f} | {blocks} | {cached} |" for t, rss, blocks, cached in samples],
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:5]))
    assert outcome["failed"] == 0 and idle_blocks == 0
