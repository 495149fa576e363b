"""Serving benchmark (bench/serve/): `adapterhub serve` against a PEFT baseline server, both over HTTP
on loopback, under the same open-loop load (the issue's benchmark).

    .venv/bin/python -m pytest bench/serve -q        (about 8 minutes on 2 CPU cores)

Workload (loadgen.py): Poisson arrivals at one offered rate for every configuration, prompts of
32-64 tokens of varied text, 32 completion tokens each (greedy, ignore_eos), each request naming one
of N adapters (uniform or Zipf popularity). 64 random LoRA adapters, r=16 on all 7 projections
(adapters.py), the same files for both servers.

Configurations: ours with 1, 8 and 64 distinct adapters (8 and 64 both uniform and skewed), the PEFT
baseline (peft_server.py: one request at a time, `set_adapter` per request) with 1 and 64.

The offered rate: unless ADAPTERHUB_BENCH_SERVE_RATE (requests/s) is set, it is measured in the same
run as RATE_OVER x our capacity with one adapter (a short overload of our server, read off its token
counter), so that every configuration is at or above capacity: tokens/s then compares capacities, on
any machine. Each run sends for DURATION seconds and waits GRACE seconds more; what is unfinished
then is cancelled and not counted (only the PEFT baseline leaves requests unfinished).
Results: bench/results/serve_smollm2.{md,json,png} (report.py redraws the table and the plot).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict

import pytest

from bench.serve import loadgen, report
from bench.serve.adapters import COUNT, RANK, make_adapters, names
from bench.serve.servers import Server, ours_command, peft_command
from bench.tables import MEDIANS, layout, machine

TABLE = "serve_smollm2"
DURATION = float(os.environ.get("ADAPTERHUB_BENCH_SERVE_DURATION", 25))  # seconds of arrivals per run
GRACE = 15.0  # seconds a run waits after its last arrival
RATE_OVER = 1.1  # offered load over our capacity with one adapter
CALIBRATION = dict(rate=12.0, seconds=14.0, skip=5.0)  # an overload; tokens/s read over its last 9 s
CONFIGS = [("ours", 1, "uniform"), ("ours", 8, "uniform"), ("ours", 8, "zipf"), ("ours", 64, "uniform"),
           ("ours", 64, "zipf"), ("peft", 1, "uniform"), ("peft", 64, "uniform"), ("peft", 64, "zipf")]
RESULTS: dict = {}  # what results/serve_smollm2.json holds


class Suite:
    """The adapters, the tokenizer, one server at a time, and the offered rate (measured once)."""

    def __init__(self):
        self.adapters = make_adapters()
        self.tokenizer = loadgen.tokenizer()
        self.server: Server | None = None
        self.rate: float | None = None

    def use(self, kind: str) -> Server:
        """The `kind` server, started (and warmed up) on first use; the other one is stopped first."""
        if self.server is not None and self.server.name == kind:
            return self.server
        if self.server is not None:
            self.server.stop()
        command = ours_command(self.adapters) if kind == "ours" else peft_command(self.adapters)
        self.server = Server(kind, command).start()
        RESULTS.setdefault("startup_s", {})[kind] = round(self.server.started_in, 1)
        warm = loadgen.Workload(rate=2.0, duration=2.0, adapters=2, seed=99)
        loadgen.measure(self.server.url, warm, loadgen.plan(warm, names(), self.tokenizer), grace=60)
        self.server.wait_idle()
        return self.server

    def offered_rate(self) -> float:
        if self.rate is None:
            if os.environ.get("ADAPTERHUB_BENCH_SERVE_RATE"):
                self.rate = float(os.environ["ADAPTERHUB_BENCH_SERVE_RATE"])
                RESULTS["rate_from"] = "ADAPTERHUB_BENCH_SERVE_RATE"
            else:
                capacity = self.capacity(self.use("ours"))
                self.rate = round(RATE_OVER * capacity / loadgen.MAX_TOKENS, 2)
                RESULTS["rate_from"] = f"{RATE_OVER} x our capacity with one adapter"
                RESULTS["calibration"] = {**CALIBRATION, "capacity_tokens_per_s": round(capacity, 1)}
            RESULTS["rate"] = self.rate
        return self.rate

    def capacity(self, server: Server) -> float:
        """Tokens/s of `server` under an overload with one adapter, from its own token counter."""
        c = CALIBRATION
        workload = loadgen.Workload(rate=c["rate"], duration=c["seconds"], adapters=1, seed=7)
        planned = loadgen.plan(workload, names(), self.tokenizer)

        async def scrape() -> float:
            await asyncio.sleep(c["skip"])
            first, t0 = await asyncio.to_thread(server.generated_tokens), time.perf_counter()
            await asyncio.sleep(c["seconds"] - c["skip"])
            return (await asyncio.to_thread(server.generated_tokens) - first) / (time.perf_counter() - t0)

        async def both():
            return await asyncio.gather(loadgen.run(server.url, workload, planned, grace=0.0), scrape())

        _, tokens_per_s = asyncio.run(both())
        server.wait_idle()
        if tokens_per_s > 0.8 * c["rate"] * workload.max_tokens:
            pytest.fail(f"calibration did not overload the server ({tokens_per_s:.0f} tokens/s of "
                        f"{c['rate'] * workload.max_tokens:.0f} offered): raise CALIBRATION['rate']")
        return tokens_per_s

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="module")
def suite():
    s = Suite()
    RESULTS.update(machine=machine(), adapters=COUNT, rank=RANK, duration_s=DURATION, grace_s=GRACE,
                   max_tokens=loadgen.MAX_TOKENS, prompt_tokens=list(loadgen.PROMPT_TOKENS), zipf_s=loadgen.ZIPF_S,
                   runs=[])
    try:
        yield s
    finally:
        s.close()
        if RESULTS["runs"]:
            report.save(RESULTS)


@pytest.mark.parametrize("server,adapters,popularity", CONFIGS,
                         ids=[f"{s}-{n}-{p}" for s, n, p in CONFIGS])
def bench_serve(benchmark, suite, server, adapters, popularity):
    rate = suite.offered_rate()
    target = suite.use(server)
    workload = loadgen.Workload(rate=rate, duration=DURATION, adapters=adapters, popularity=popularity)
    planned = loadgen.plan(workload, names(), suite.tokenizer)
    summary = benchmark.pedantic(loadgen.measure, args=(target.url, workload, planned), kwargs={"grace": GRACE},
                                 rounds=1, iterations=1)
    target.wait_idle()
    run = {"server": server, "adapters": adapters, "popularity": popularity, "rate": rate, **asdict(summary)}
    RESULTS["runs"].append(run)
    benchmark.extra_info.update(run)
    MEDIANS[TABLE][report.case(run)] = {"tokens_per_s": summary.tokens_per_s}
    assert summary.completed > 0 and not summary.failed, f"{summary.failed} requests failed: {summary.errors}"


@layout(TABLE)
def serve_table(rows: dict) -> str:
    return report.table(RESULTS)
