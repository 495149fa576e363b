"""Serving benchmark (bench/serve/): `adapterhub serve` against a PEFT baseline server, both over HTTP
on loopback, under the same open-loop load (the issue's benchmark).

    .venv/bin/python -m pytest bench/serve -q        (about 9 minutes on 2 CPU cores)

Workload (loadgen.py): Poisson arrivals at one offered rate for every configuration, prompts of
32-64 tokens of varied text, 32 completion tokens each (greedy, ignore_eos), each request naming one
of N adapters (uniform or Zipf popularity). 64 random LoRA adapters, r=16 on all 7 projections
(adapters.py), the same files for both servers.

Configurations: ours with 1, 8 and 64 distinct adapters (8 and 64 both uniform and skewed), the PEFT
baseline (peft_server.py: one request at a time, `set_adapter` per request) with 1 and 64.

The offered rate, RATE requests/s (ADAPTERHUB_BENCH_SERVE_RATE changes it), is the same for every
configuration, chosen at or just above what our server sustains with one adapter on the 2-core CPU
and far above what the PEFT baseline does, so that tokens/s compares capacities (bench/README.md
says how it was measured).

Each run sends for DURATION seconds. Ours then runs until every request finished (GRACE["ours"] is
only a safety net); the PEFT baseline, whose queue would take minutes, gets GRACE["peft"] seconds:
its requests unfinished then are cancelled and not counted. Two throughputs: tokens/s over the run
(completion tokens of the completed requests / first send to last completion, the issue's measure)
and steady tokens/s (tokens the server generated from SKIP s to the end of the arrivals, by its own
counter: the rate while the load is on, without ramp up and drain).
Results: bench/results/serve_smollm2.{md,json,png} (report.py redraws the table and the plot).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict

import pytest

for _module in ("fastapi", "uvicorn", "httpx", "prometheus_client", "matplotlib"):  # the server's extra, the plot
    pytest.importorskip(_module)

from bench.serve import loadgen, report  # noqa: E402
from bench.serve.adapters import COUNT, RANK, make_adapters, names  # noqa: E402
from bench.serve.servers import OtherLoad, Server, ours_command, peft_command  # noqa: E402
from bench.tables import MEDIANS, layout, machine  # noqa: E402

TABLE = "serve_smollm2"
RATE = float(os.environ.get("ADAPTERHUB_BENCH_SERVE_RATE", 4.5))  # requests/s offered: 144 completion tokens/s
DURATION = float(os.environ.get("ADAPTERHUB_BENCH_SERVE_DURATION", 30))  # seconds of arrivals per run
GRACE = {"ours": 120.0, "peft": 15.0}  # seconds a run waits after its last arrival
SKIP = DURATION / 2  # seconds of ramp up (a full batch takes about 15 s here) left out of the steady tokens/s
CONFIGS = [
    ("ours", 1, "uniform"),
    ("ours", 8, "uniform"),
    ("ours", 8, "zipf"),
    ("ours", 64, "uniform"),
    ("ours", 64, "zipf"),
    ("peft", 1, "uniform"),
    ("peft", 64, "uniform"),
    ("peft", 64, "zipf"),
]
RESULTS: dict = {}  # what results/serve_smollm2.json holds


class Suite:
    """The adapters, the tokenizer, and one server at a time."""

    def __init__(self):
        self.adapters = make_adapters()
        self.tokenizer = loadgen.tokenizer()
        self.server: Server | None = None

    def use(self, kind: str) -> Server:
        """The `kind` server, started (and warmed up) on first use; the other one is stopped first."""
        if self.server is not None and self.server.name == kind:
            return self.server
        if self.server is not None:
            self.server.stop()
        command = ours_command(self.adapters) if kind == "ours" else peft_command(self.adapters)
        self.server = Server(kind, command).start()
        RESULTS["startup_s"][kind] = round(self.server.started_in, 1)
        warm = loadgen.Workload(rate=2.0, duration=2.0, adapters=2, seed=99)
        loadgen.measure(self.server.url, warm, loadgen.plan(warm, names(), self.tokenizer), grace=60)
        self.server.wait_idle()
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def counted(
    server: Server, workload: loadgen.Workload, planned: list[loadgen.Planned], *, grace: float, skip: float
) -> tuple[loadgen.Summary, float]:
    """Runs the load; also returns the tokens/s the server generated from `skip` s to the end of the
    arrivals (its adapterhub_generated_tokens_total, which both servers count): steady state, while the
    load is on, without the ramp up at the start and the drain at the end."""

    async def scrape() -> float:
        await asyncio.sleep(skip)
        first, t0 = await asyncio.to_thread(server.generated_tokens), time.perf_counter()
        await asyncio.sleep(workload.duration - skip)
        return (await asyncio.to_thread(server.generated_tokens) - first) / (time.perf_counter() - t0)

    async def both():
        return await asyncio.gather(loadgen.run(server.url, workload, planned, grace=grace), scrape())

    outcomes, tokens_per_s = asyncio.run(both())
    return loadgen.summarize(workload, outcomes), tokens_per_s


@pytest.fixture(scope="module")
def suite():
    s = Suite()
    RESULTS.update(
        machine=machine(),
        adapters=COUNT,
        rank=RANK,
        rate=RATE,
        duration_s=DURATION,
        grace_s=GRACE,
        skip_s=SKIP,
        max_tokens=loadgen.MAX_TOKENS,
        prompt_tokens=list(loadgen.PROMPT_TOKENS),
        zipf_s=loadgen.ZIPF_S,
        startup_s={},
        runs=[],
    )
    try:
        yield s
    finally:
        s.close()
        if RESULTS["runs"]:
            report.save(RESULTS)


@pytest.mark.parametrize("server,adapters,popularity", CONFIGS, ids=[f"{s}-{n}-{p}" for s, n, p in CONFIGS])
def bench_serve(benchmark, suite, server, adapters, popularity):
    target = suite.use(server)
    workload = loadgen.Workload(rate=RATE, duration=DURATION, adapters=adapters, popularity=popularity)
    planned = loadgen.plan(workload, names(), suite.tokenizer)
    with OtherLoad(target) as other:
        summary, steady = benchmark.pedantic(
            counted,
            args=(target, workload, planned),
            kwargs={"grace": GRACE[server], "skip": SKIP},
            rounds=1,
            iterations=1,
        )
    target.wait_idle()
    run = {
        "server": server,
        "adapters": adapters,
        "popularity": popularity,
        "rate": RATE,
        **asdict(summary),
        "steady_tokens_per_s": steady,
        "other_cpu_cores": other.value,
    }
    RESULTS["runs"].append(run)
    benchmark.extra_info.update(run)
    MEDIANS[TABLE][report.case(run)] = {"tokens_per_s": summary.tokens_per_s}
    assert summary.completed > 0 and not summary.failed, f"{summary.failed} requests failed: {summary.errors}"


@layout(TABLE)
def serve_table(rows: dict) -> str:
    return report.table(RESULTS)
