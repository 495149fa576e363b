"""Soak: 1,000 distinct adapters through 16 slots for minutes of mixed churn, every answer checked.

    PYTHONPATH=. .venv/bin/python -m bench.soak.soak                 (10 minutes; --minutes 1 for a try)

`adapterhub serve --max-adapters 16` runs as a real subprocess on 127.0.0.1 over the tests' tiny
llama (tests/serving.py), with a keys file of a few tenants and an admin, and an --adapter-dir of
1,000 + spare distinct LoRA adapters (bench/soak/common.py: ranks 4 and 8 on all projections, own
random tensors each). All 1,000 names are loaded through POST /v1/adapters first; then, for
--minutes:

- completion clients (closed loop, --clients of them, tenants' keys in turn) ask for greedy
  completions (temperature 0, ignore_eos, --max-tokens tokens, n of 1 or 2, streamed or not) of a
  random prompt on a random name (half uniform over the names, half Zipf, so that hot names get
  prefix-cache hits and cold ones evictions), a twentieth on the base model;
- admin workers (--admin-workers, --ops-per-second in all) replace a present name with other files
  (POST on the name), delete one (DELETE), or load an absent one again (POST), never two operations
  on one name at once.

Every answer is checked against the offline reference (`adapterhub.Backbone` in this process,
computed for every adapter directory before the run) of the adapter version the server had while
the request was being sent: a name's version is certain outside its operations; during one (from
the moment the POST/DELETE is sent until its answer is received) both the old and the new state are
possible, so a request whose window (from sending until the response's headers) overlaps an
operation may get either, and 404 where the name was absent at some point of its window; anything
else is wrong. Answers whose reference has a near tie (the two best logits within 1e-5 somewhere on
the greedy path) are not sent for the version current at sending; should one come back different,
it counts apart as a near tie, not as correct.

Counted: requests, wrong answers (must be 0), 5xx (must be 0; 503 counted by cause), 404/429 by
cause, loads/replaces/deletes and their answers, evictions and adapter loads (/metrics, admin key),
the server's VmRSS, threads and open files sampled every 5 s (RSS growth from the end of
--warmup to the end: target < 5 %), and at the end that the server is idle, holds no KV blocks and
lists exactly the adapters (and sources) the client expects. Results: bench/results/soak-<date>.md
and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime
import json
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from .common import (
    BASE_NAME,
    CpuWatch,
    Reference,
    keys_file,
    machine,
    make_adapters,
    metric,
    percentile,
    prompts,
    revision,
    rss_mib,
    serve_command,
    start_server,
    write_base,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"
TIE = 1e-5  # a reference answer whose top-2 logits come this close somewhere is a near tie
BASE = "<base>"  # the base model's state in the timelines (Reference keys it as None)
INF = math.inf


@dataclass
class Interval:
    state: str | None  # adapter directory name (under --adapter-dir), BASE, or None: absent
    start: float  # possible from (the operation's sending)
    end: float = INF  # possible until (the next operation's answer)


class Timeline:
    """The states one name may have had over time: each successful operation ends the previous state
    when its answer comes, and makes the new one possible from when it was sent."""

    def __init__(self, state: str | None = None):
        self.intervals = [Interval(state, -INF)]
        self.busy = False  # an operation in flight (never two at once on one name)
        self.pending: str | None = None  # the state that operation would give

    @property
    def current(self) -> str | None:
        return self.intervals[-1].state

    def changed(self, state: str | None, sent: float, done: float) -> None:
        self.intervals[-1].end = done
        self.intervals.append(Interval(state, sent))

    def unknown(self, state: str | None, sent: float) -> None:
        """An operation whose outcome is unknown (no answer): both states stay possible from then on."""
        self.intervals.append(Interval(state, sent))

    def possible(self, start: float, end: float) -> set[str | None]:
        return {i.state for i in self.intervals if i.start <= end and i.end >= start}

    def present(self) -> bool:
        return self.current is not None


@dataclass
class Sent:
    name: str
    tenant: int
    prompt: int
    n: int
    stream: bool
    sent: float
    bound: float = 0.0  # headers received (streamed) or the whole answer (not)
    status: int = 0  # HTTP status, or the error event's code inside a stream; 0: no answer
    texts: list[str] = field(default_factory=list)
    completion_tokens: int = -1
    message: str = ""
    retry_after: str | None = None


@dataclass
class Op:
    kind: str  # initial / load / replace / delete
    name: str
    state: str | None
    sent: float
    done: float = 0.0
    status: int = 0
    message: str = ""


def cause(message: str) -> str:
    """A short, stable cause of an error message (numbers and names stripped)."""
    words = []
    for word in message.split():
        if any(c.isdigit() for c in word) or word.startswith("'"):
            word = "#"
        words.append(word)
        if len(words) == 9:
            break
    return " ".join(words)


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.names = [f"n{i:04d}" for i in range(args.adapters)]
        order = self.names[:]
        self.rng.shuffle(order)
        weights = [1 / (k + 1) for k in range(len(order))]
        total = sum(weights)
        self.zipf_order, self.zipf_cdf = order, list(_cumulative([w / total for w in weights]))
        self.timelines = {name: Timeline() for name in self.names}
        self.timelines[BASE_NAME] = Timeline(BASE)
        self.requests: list[Sent] = []
        self.ops: list[Op] = []
        self.samples: list[dict] = []
        self.stop_at = INF

    # ---- choices ---------------------------------------------------------------------------
    def pick_name(self, rng: random.Random) -> str:
        if rng.random() < 0.05:
            return BASE_NAME
        for _ in range(20):
            if rng.random() < 0.5:
                name = rng.choice(self.names)
            else:
                name = self.zipf_order[min(bisect.bisect(self.zipf_cdf, rng.random()), len(self.names) - 1)]
            timeline = self.timelines[name]
            if timeline.present() or timeline.busy:  # absent and idle: a certain 404, not worth sending
                return name
        return BASE_NAME

    def pick_prompt(self, rng: random.Random, name: str) -> int:
        """A prompt whose answer is no near tie for the name's current state (nor a pending one)."""
        timeline = self.timelines[name]
        states = {timeline.current, timeline.pending if timeline.busy else None}
        for _ in range(50):
            p = rng.randrange(len(self.prompt_texts))
            if all(self.margin(s, p) >= TIE for s in states if s is not None):
                return p
        return p

    def margin(self, state: str, prompt: int) -> float:
        return self.reference.margins[self.source(state)][prompt]

    def source(self, state: str) -> str | None:
        return None if state == BASE else str(self.adapter_root / state)

    # ---- the run ---------------------------------------------------------------------------
    async def run(self, url: str, pid: int) -> None:
        args = self.args
        # keep-alive shorter than uvicorn's 5 s (httpx's default is also 5 s: a POST on a connection the
        # server is just closing then fails with ReadError)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=2.0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(args.timeout)) as client:
            self.client, self.pid, self.root = client, pid, url.removesuffix("/v1")
            start = time.perf_counter()
            await self.load_all()
            self.initial_load_s = time.perf_counter() - start
            print(f"loaded {len(self.names)} adapters through {args.slots} slots in {self.initial_load_s:.1f} s")
            self.t0 = time.perf_counter()
            self.stop_at = self.t0 + args.minutes * 60
            sampler = asyncio.create_task(self.sample_loop())
            workers = [asyncio.create_task(self.completion_worker(k)) for k in range(args.clients)]
            admins = [asyncio.create_task(self.admin_worker(k)) for k in range(args.admin_workers)]
            await asyncio.gather(*workers, *admins)
            self.traffic_s = time.perf_counter() - self.t0
            await asyncio.sleep(2.0)  # let the last rows leave
            await self.sample(final=True)
            sampler.cancel()
            self.final = await self.final_state()

    async def load_all(self) -> None:
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with gate:
                await self.operate("initial", self.names[i], f"d{i:04d}")

        await asyncio.gather(*(one(i) for i in range(len(self.names))))
        self.all_dirs = [f"d{i:04d}" for i in range(self.args.adapters + self.args.spares)]

    async def operate(self, kind: str, name: str, state: str | None) -> Op:
        """One operation on `name` (its timeline marked busy meanwhile), recorded."""
        timeline = self.timelines[name]
        timeline.busy, timeline.pending = True, state
        op = Op(kind, name, state, time.perf_counter())
        self.ops.append(op)
        try:
            if state is None:
                response = await self.client.delete(f"/adapters/{name}", headers=self.admin)
            else:
                response = await self.client.post("/adapters", json={"name": name, "source": state}, headers=self.admin)
            op.done, op.status = time.perf_counter(), response.status_code
            if response.status_code in (200, 201, 202):
                timeline.changed(state, op.sent, op.done)
            else:
                op.message = _message(response)
        except httpx.HTTPError as error:
            op.done, op.status, op.message = time.perf_counter(), 0, f"{type(error).__name__}: {error}"
            timeline.unknown(state, op.sent)
        finally:
            timeline.busy = False
        return op

    async def admin_worker(self, k: int) -> None:
        rng = random.Random(self.args.seed * 7919 + 1000 + k)
        rate = self.args.ops_per_second / self.args.admin_workers
        while True:
            await asyncio.sleep(rng.expovariate(rate) if rate > 0 else INF)
            if time.perf_counter() >= self.stop_at:
                return
            idle = [n for n in self.names if not self.timelines[n].busy]
            absent = [n for n in idle if not self.timelines[n].present()]
            present = [n for n in idle if self.timelines[n].present()]
            roll = rng.random()
            if absent and (roll < 0.25 or len(absent) > 0.05 * len(self.names)):
                name = rng.choice(absent)
                await self.operate("load", name, rng.choice(self.all_dirs))
            elif roll < 0.5 and present:
                name = self.zipf_name(rng) if rng.random() < 0.5 else rng.choice(present)
                if self.timelines[name].busy or not self.timelines[name].present():
                    continue
                await self.operate("delete", name, None)
            elif present:
                name = self.zipf_name(rng) if rng.random() < 0.5 else rng.choice(present)
                timeline = self.timelines[name]
                if timeline.busy or not timeline.present():
                    continue
                other = rng.choice(self.all_dirs)
                while other == timeline.current:
                    other = rng.choice(self.all_dirs)
                await self.operate("replace", name, other)

    def zipf_name(self, rng: random.Random) -> str:
        return self.zipf_order[min(bisect.bisect(self.zipf_cdf, rng.random()), len(self.names) - 1)]

    async def completion_worker(self, k: int) -> None:
        rng = random.Random(self.args.seed * 104729 + k)
        tenant = k % self.args.tenants
        headers = {"Authorization": f"Bearer sk-tenant{tenant}"}
        while time.perf_counter() < self.stop_at:
            name = self.pick_name(rng)
            p = self.pick_prompt(rng, name)
            record = Sent(name, tenant, p, 2 if rng.random() < 0.2 else 1, rng.random() < 0.5, 0.0)
            body = {
                "model": name,
                "prompt": self.prompt_texts[p],
                "max_tokens": self.args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "n": record.n,
            }
            self.requests.append(record)
            record.sent = time.perf_counter()
            try:
                if record.stream:
                    await self.streamed(body, headers, record)
                else:
                    response = await self.client.post("/completions", json=body, headers=headers)
                    record.bound, record.status = time.perf_counter(), response.status_code
                    if response.status_code == 200:
                        data = response.json()
                        texts = {c["index"]: c["text"] for c in data["choices"]}
                        record.texts = [texts.get(i, "") for i in range(record.n)]
                        record.completion_tokens = data["usage"]["completion_tokens"]
                    else:
                        record.message, record.retry_after = _message(response), response.headers.get("retry-after")
            except httpx.HTTPError as error:
                record.status, record.message = 0, f"{type(error).__name__}: {error}"
                record.bound = record.bound or time.perf_counter()
            if record.status == 429:  # honour Retry-After (none is expected here: the queue is large)
                await asyncio.sleep(float(record.retry_after or 1))

    async def streamed(self, body: dict, headers: dict, record: Sent) -> None:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with self.client.stream("POST", "/completions", json=body, headers=headers) as response:
            record.bound, record.status = time.perf_counter(), response.status_code
            if response.status_code != 200:
                await response.aread()
                record.message, record.retry_after = _message(response), response.headers.get("retry-after")
                return
            texts = [""] * record.n
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.status, record.message = int(event["error"].get("code") or 500), event["error"]["message"]
                    return
                for choice in event["choices"]:
                    texts[choice["index"]] += choice.get("text", "")
                if event.get("usage"):
                    record.completion_tokens = event["usage"]["completion_tokens"]
            record.texts = texts

    async def sample_loop(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            await self.sample()

    async def sample(self, final: bool = False) -> None:
        t = time.perf_counter() - self.t0
        pid = self.pid
        status = Path(f"/proc/{pid}/status").read_text()
        threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        sample = {"t": round(t, 1), "rss_mib": round(rss_mib(pid), 1), "threads": threads, "fds": fds}
        if final or not self.samples or t - self.samples[-1].get("metrics_t", -INF) >= 30:
            text = (await self.client.get(self.root + "/metrics", headers=self.admin)).text
            sample |= {
                "metrics_t": t,
                "evictions": metric(text, "adapterhub_adapter_evictions_total"),
                "slot_loads": metric(text, "adapterhub_adapter_loads_total", result="ok"),
                "slot_load_errors": metric(text, "adapterhub_adapter_loads_total", result="error"),
                "kv_blocks_used": metric(text, "adapterhub_kv_blocks_used"),
                "prefix_hits": metric(text, "adapterhub_prefix_cache_hits_total"),
                "adapters": metric(text, "adapterhub_adapters"),
            }
            done = len(self.requests)
            print(
                f"{t:6.0f} s  requests {done:6d}  ops {len(self.ops) - len(self.names):5d}"
                f"  RSS {sample['rss_mib']:.0f} MiB  threads {threads}  fds {fds}  evictions {sample['evictions']:.0f}",
                flush=True,
            )
        else:
            sample["metrics_t"] = self.samples[-1]["metrics_t"]
        self.samples.append(sample)

    async def final_state(self) -> dict:
        health = (await self.client.get(self.root + "/health")).json()
        listing = (await self.client.get("/adapters", headers=self.admin)).json()["data"]
        served = {a["id"]: a["source"] for a in listing}
        expected = {n: t.current for n, t in self.timelines.items() if n != BASE_NAME and t.present()}
        text = (await self.client.get(self.root + "/metrics", headers=self.admin)).text
        return {
            "health": health,
            "kv_blocks_used": metric(text, "adapterhub_kv_blocks_used"),
            "listed": len(served),
            "expected": len(expected),
            "listing_matches": served == expected,
            "listing_differences": sorted(set(served.items()) ^ set(expected.items()))[:10],
        }

    # ---- checking --------------------------------------------------------------------------
    def check(self) -> dict:
        out = Counter()
        examples: list[dict] = []
        by_cause: dict[str, Counter] = {"404": Counter(), "429": Counter(), "503": Counter(), "other": Counter()}
        latencies = []
        for r in self.requests:
            if r.sent >= self.stop_at or not r.sent:
                continue
            out["requests"] += 1
            out["streamed"] += r.stream
            out[f"n={r.n}"] += 1
            possible = self.timelines[r.name].possible(r.sent, r.bound)
            if len(possible) > 1:
                out["window_spans_an_operation"] += 1
            if r.status == 200:
                latencies.append(r.bound - r.sent)
                refs = {s: self.reference.texts[self.source(s)][r.prompt] for s in possible if s is not None}
                matched = [s for s, text in refs.items() if all(t == text for t in r.texts)]
                tokens_ok = r.completion_tokens == r.n * self.args.max_tokens
                if matched and tokens_ok:
                    out["correct"] += 1
                    if len(refs) > 1:
                        order = [i.state for i in self.timelines[r.name].intervals if i.state in refs]
                        if len(matched) > 1:
                            out["ambiguous_same_text"] += 1
                        else:
                            out["ambiguous_got_newer" if matched[0] == order[-1] else "ambiguous_got_older"] += 1
                elif any(self.margin(s, r.prompt) < TIE for s in refs):
                    out["near_tie"] += 1
                else:
                    out["wrong"] += 1
                    if len(examples) < 20:
                        examples.append(
                            {
                                **asdict(r),
                                "possible": sorted(map(str, possible)),
                                "expected": refs,
                                "completion_tokens_expected": r.n * self.args.max_tokens,
                            }
                        )
            elif r.status == 404:
                kind = "404 while the name was absent or being deleted/loaded"
                if None not in possible:
                    kind = "404 UNEXPECTED (the name was present throughout)"
                    out["unexpected_404"] += 1
                    if len(examples) < 20:
                        examples.append({**asdict(r), "possible": sorted(map(str, possible))})
                by_cause["404"][kind] += 1
                out["404"] += 1
            elif r.status == 429:
                by_cause["429"][cause(r.message)] += 1
                out["429"] += 1
                out["429_without_retry_after"] += not r.retry_after
            elif r.status == 503:
                by_cause["503"][cause(r.message)] += 1
                out["503"] += 1
            else:
                key = f"{r.status or 'no answer'}: {cause(r.message)}"
                by_cause["other"][key] += 1
                out["5xx" if r.status >= 500 else "other_errors"] += 1
                if len(examples) < 20:
                    examples.append({**asdict(r), "possible": sorted(map(str, possible))})
        ops = Counter()
        op_causes = Counter()
        for op in self.ops:
            ops[f"{op.kind} {op.status or 'no answer'}"] += 1
            if op.status not in (200, 201, 202):
                op_causes[f"{op.kind} {op.status}: {cause(op.message)}"] += 1
        return {
            "counts": dict(out),
            "by_cause": {k: dict(v) for k, v in by_cause.items() if v},
            "ops": dict(sorted(ops.items())),
            "op_failures": dict(op_causes),
            "examples": examples,
            "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99),
            "latency_max_s": max(latencies, default=math.nan),
        }

    @property
    def admin(self) -> dict:
        return {"Authorization": "Bearer sk-admin"}


def _cumulative(values):
    total = 0.0
    for v in values:
        total += v
        yield total


def _message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def rss_summary(samples: list[dict], warmup: float) -> dict:
    after = [s for s in samples if s["t"] >= warmup] or samples[-1:]
    first, last = after[0], after[-1]
    peak = max(s["rss_mib"] for s in after)
    # least-squares slope after warm-up, MiB per minute
    n = len(after)
    slope = math.nan
    if n > 2:
        mt = sum(s["t"] for s in after) / n
        mr = sum(s["rss_mib"] for s in after) / n
        den = sum((s["t"] - mt) ** 2 for s in after)
        slope = sum((s["t"] - mt) * (s["rss_mib"] - mr) for s in after) / den * 60 if den else math.nan
    return {
        "rss_start_mib": samples[0]["rss_mib"] if samples else math.nan,
        "rss_after_warmup_mib": first["rss_mib"],
        "rss_end_mib": last["rss_mib"],
        "rss_peak_after_warmup_mib": peak,
        "rss_growth_pct": 100 * (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"],
        "rss_slope_mib_per_min": slope,
        "threads_after_warmup": first["threads"],
        "threads_end": last["threads"],
        "fds_after_warmup": first["fds"],
        "fds_end": last["fds"],
    }


def render(result: dict) -> str:
    c, r, a = result["check"]["counts"], result["rss"], result["args"]
    ev = result["metrics_end"]
    verdict = lambda ok: "met" if ok else "NOT MET"  # noqa: E731
    lines = [
        f"## soak ({result['date']})",
        "",
        f"Machine: {result['machine']}; adapterhub at {result['revision']}. "
        f"Server: `adapterhub serve --max-adapters {a['slots']} --max-rank 8` "
        f"(defaults otherwise: --max-batch 64, --max-queue 1024), the tests' tiny llama (2 layers, hidden 32, "
        f"character tokenizer), 1 torch thread, a keys file of {a['tenants']} tenants + an admin.",
        "",
        f"{a['adapters']} distinct LoRA adapters (ranks 4/8, all projections) + {a['spares']} spare directories "
        f"for replaces, {a['slots']} slots; {a['clients']} completion clients (closed loop: greedy, ignore_eos, "
        f"{a['max_tokens']} tokens, n 1-2, half streamed; names half uniform, half Zipf; 5 % base), "
        f"{a['admin_workers']} admin workers at {a['ops_per_second']} operations/s (replace 50 %, delete 25 %, "
        f"load 25 %); {result['traffic_s'] / 60:.1f} minutes of traffic after loading all {a['adapters']} names "
        f"({result['initial_load_s']:.1f} s). RSS baseline: after {a['warmup']:.0f} s of traffic.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| completion requests | {c.get('requests', 0)} ({c.get('requests', 0) / result['traffic_s']:.1f}/s) | |",
        f"| answers checked against the offline reference | {c.get('correct', 0) + c.get('wrong', 0)} | |",
        f"| wrong answers | {c.get('wrong', 0)} | 0: {verdict(not c.get('wrong'))} |",
        f"| near ties (reference within {TIE:g} between two tokens; not counted correct) | {c.get('near_tie', 0)} | |",
        f"| requests whose window overlapped an operation on their name | {c.get('window_spans_an_operation', 0)} "
        f"(got older version {c.get('ambiguous_got_older', 0)}, newer {c.get('ambiguous_got_newer', 0)}) | |",
        f"| 5xx (503 apart) | {c.get('5xx', 0)} | 0: {verdict(not c.get('5xx'))} |",
        f"| 503 | {c.get('503', 0)} | |",
        f"| 404 | {c.get('404', 0)} (unexpected: {c.get('unexpected_404', 0)}) | unexpected 0: "
        f"{verdict(not c.get('unexpected_404'))} |",
        f"| 429 | {c.get('429', 0)} | |",
        f"| other failures (no answer, 4xx) | {c.get('other_errors', 0)} | 0 |",
        f"| latency p50 / p99 / max (s, to the whole answer or the headers) | {result['check']['latency_p50_s']:.3f} / "
        f"{result['check']['latency_p99_s']:.3f} / {result['check']['latency_max_s']:.3f} | |",
        f"| adapter operations (answer: count) | "
        f"{', '.join(f'{k}: {v}' for k, v in result['check']['ops'].items())} | |",
        f"| evictions (/metrics) | {ev['evictions']:.0f} | |",
        f"| slot loads (/metrics; errors) | {ev['slot_loads']:.0f} ({ev['slot_load_errors']:.0f}) | |",
        f"| prefix-cache block hits | {ev['prefix_hits']:.0f} | |",
        f"| RSS after warm-up -> end (peak) | {r['rss_after_warmup_mib']:.0f} -> {r['rss_end_mib']:.0f} MiB "
        f"({r['rss_peak_after_warmup_mib']:.0f}) | |",
        f"| RSS growth after warm-up | {r['rss_growth_pct']:+.2f} % (trend {r['rss_slope_mib_per_min']:+.2f} "
        f"MiB/min) | < 5 %: {verdict(r['rss_growth_pct'] < 5)} |",
        f"| threads / open files, after warm-up -> end | {r['threads_after_warmup']} -> {r['threads_end']} / "
        f"{r['fds_after_warmup']} -> {r['fds_end']} | |",
        f"| at the end: queue, rows, KV blocks held | {result['final']['health']['queue_depth']}, "
        f"{result['final']['health']['running_rows']}, {result['final']['kv_blocks_used']:.0f} | 0 |",
        f"| listing = the client's model of names and sources | {result['final']['listing_matches']} "
        f"({result['final']['listed']} listed, {result['final']['expected']} expected) | True |",
        f"| server log: tracebacks / ERROR lines | {result['log']['tracebacks']} / {result['log']['errors']} | 0 |",
        "",
    ]
    for kind, causes in result["check"]["by_cause"].items():
        lines.append(f"{kind} by cause: " + "; ".join(f"{k} ({v})" for k, v in causes.items()))
    if result["check"]["op_failures"]:
        lines.append(
            "Operations not done: " + "; ".join(f"{k} ({v})" for k, v in result["check"]["op_failures"].items())
        )
    w = result["load"]
    lines += [
        "",
        f"What else ran: other processes used {w['other_cores']} of {w['cpus']} cores on average (this benchmark "
        f"and the server {w['ours_cores']}); load average at the end {' '.join(w['loadavg'])}; busiest others: "
        + ("; ".join(f"`{p}`" for p in w["busiest_others"][:3]) or "none"),
        "",
        "| t s | RSS MiB | threads | open files | evictions |",
        "|---|---|---|---|---|",
    ]
    samples = list({round(s["t"]): s for s in result["samples"]}.values())  # the final sample may repeat the last
    every = max(1, len(samples) // 20)
    shown = samples[::every] + ([samples[-1]] if (len(samples) - 1) % every else [])
    last_ev = 0.0
    for s in shown:
        last_ev = s.get("evictions", last_ev)
        lines.append(f"| {s['t']:.0f} | {s['rss_mib']:.0f} | {s['threads']} | {s['fds']} | {last_ev:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of traffic (after loading every name)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of traffic before the RSS baseline")
    parser.add_argument("--adapters", type=int, default=1000, help="distinct adapter names")
    parser.add_argument("--spares", type=int, default=200, help="extra adapter directories replaces may use")
    parser.add_argument("--slots", type=int, default=16, help="--max-adapters")
    parser.add_argument("--clients", type=int, default=24, help="concurrent completion clients")
    parser.add_argument("--tenants", type=int, default=4, help="tenant keys the clients take turns with")
    parser.add_argument("--admin-workers", dest="admin_workers", type=int, default=4)
    parser.add_argument("--ops-per-second", dest="ops_per_second", type=float, default=5.0)
    parser.add_argument("--max-tokens", dest="max_tokens", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts (repeats give prefix-cache hits)")
    parser.add_argument("--prompt-chars", dest="prompt_chars", type=int, default=20, help="prompt length (tokens)")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where soak-<date>[-tag].md/.json go")
    parser.add_argument("--tag", default="", help="appended to the results' file names")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (model, adapters, log)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # the reference's batches; the machine's cores are the server's and the clients'
    root = Path(tempfile.mkdtemp(prefix="adapterhub-soak-"))
    soak = Soak(args)
    try:
        start = time.perf_counter()
        base = write_base(root)
        soak.adapter_root = root / "adapters"
        dirs = make_adapters(soak.adapter_root, args.adapters + args.spares, seed=args.seed)
        print(f"wrote {len(dirs)} adapters in {time.perf_counter() - start:.1f} s under {soak.adapter_root}")
        start = time.perf_counter()
        soak.prompt_texts = prompts(args.prompts, args.prompt_chars, seed=args.seed)
        soak.reference = Reference(soak.prompt_texts, args.max_tokens)
        soak.reference.compute([None, *map(str, dirs)])
        ties = sum(m < TIE for ms in soak.reference.margins.values() for m in ms)
        seconds = time.perf_counter() - start
        print(f"reference answers: {len(dirs) + 1} x {args.prompts} in {seconds:.1f} s ({ties} near ties)")
        models = [BASE_NAME, *soak.names]
        keys = keys_file(root / "keys.json", [f"sk-tenant{k}" for k in range(args.tenants)], models)
        command = serve_command(
            base,
            "--adapter-dir", str(soak.adapter_root),
            "--max-adapters", str(args.slots),
            "--max-rank", "8",
            "--api-key", str(keys),
        )  # fmt: skip
        server = start_server("soak", command)
        watch = CpuWatch([server.process.pid]).start()
        try:
            asyncio.run(soak.run(server.url, server.process.pid))
            load = watch.stop()
        finally:
            server.stop()
        log = server.log.read_text(errors="replace")
        check = soak.check()
        last = next(s for s in reversed(soak.samples) if "evictions" in s)
        result = {
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "revision": revision(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "initial_load_s": soak.initial_load_s,
            "traffic_s": soak.traffic_s,
            "check": check,
            "rss": rss_summary(soak.samples, args.warmup),
            "metrics_end": {k: last[k] for k in ("evictions", "slot_loads", "slot_load_errors", "prefix_hits")},
            "final": soak.final,
            "log": {
                "tracebacks": log.count("Traceback"),
                "errors": sum(" ERROR " in line for line in log.splitlines()),
                "tail": log.splitlines()[-20:],
            },
            "load": load,
            "reference_near_ties": ties,
            "samples": soak.samples,
        }
        text = render(result)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"soak-{result['date']}{'-' + args.tag if args.tag else ''}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {stem}.md and .json")
        c = check["counts"]
        ok = not (c.get("wrong") or c.get("5xx") or c.get("unexpected_404"))
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
