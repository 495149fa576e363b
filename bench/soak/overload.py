"""Overload: `adapterhub serve` offered 3x its capacity, with a bounded queue and with an unbounded one.

    PYTHONPATH=. .venv/bin/python -m bench.soak.overload            (about 11 minutes)

The server (a real subprocess on 127.0.0.1) serves the tests' tiny llama (tests/serving.py, its
context widened to 1024 positions) with a keys file of three tenants. Every request is a greedy
completion (temperature 0, ignore_eos) of --max-tokens tokens for a random 16-character prompt,
not streamed; latency is to the whole answer.

1. Capacity: --clients closed-loop clients (more than the 64 rows of a batch, so that it stays
   full; their first requests of random lengths, so that rows are staggered as arrivals leave them)
   for --capacity-seconds on the bounded server: completions/s at saturation.
2. 1x: open-loop Poisson arrivals at that rate for --seconds, on the bounded server: the latency
   an operator would see at full load.
3. 3x on the bounded server (`--max-queue` --max-queue, default 64): the same tenants at 3x the
   rate. Reported: admitted requests' latency p50/p99 (against 1x), the share of 429s, whether
   every 429 carried Retry-After, 5xx (must be 0), and per tenant what was admitted. The tenants
   send 5:1:1 (the heavy one 5x each light one): max-min fairness gives each light tenant about a
   third of the capacity (its demand, 3/7 of capacity, is more than a third), so neither may starve.
4. 3x on the server with an effectively unbounded queue (`--max-queue 1000000 --max-queue-tokens
   1000000000`), the peer: the same arrivals; what it has not answered --grace seconds after the
   last arrival (default: time for its backlog to drain) is cancelled (the client disconnects) and
   enters the latency percentiles at its age then (a lower bound, marked ">="). Its latency grows
   with the run (p99 per window of sending time).

Results: bench/results/overload-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .common import (
    BASE_NAME,
    CpuWatch,
    keys_file,
    machine,
    percentile,
    prompts,
    revision,
    serve_command,
    start_server,
    write_base,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"
TENANTS = {"heavy": 5, "light1": 1, "light2": 1}  # relative arrival rates
WINDOW = 15.0  # seconds of sending time per latency window


class Http:
    """A minimal HTTP/1.1 client: one connection per request (`Connection: close`). Thousands of
    requests may wait at once on the unbounded server; httpx's connection pool rescans every waiting
    request on each event (O(waiting) each), which delayed new requests and /health polls here by
    tens of seconds on the client's side. A connection of its own per request costs nothing of that."""

    def __init__(self, url: str):
        address = url.removeprefix("http://").split("/", 1)[0]
        self.host, port = address.rsplit(":", 1)
        self.port, self.prefix = int(port), "/" + url.removeprefix("http://").split("/", 1)[1]

    async def request(self, method: str, path: str, payload: dict | None = None, key: str | None = None):
        """(status, headers (lower-case names), body bytes); OSError / ValueError when the exchange fails."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            data = json.dumps(payload).encode() if payload is not None else b""
            head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Connection: close"]
            if payload is not None:
                head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
            if key:
                head.append(f"Authorization: Bearer {key}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            return status, headers, await reader.read()
        finally:
            writer.close()


@dataclass
class Outcome:
    tenant: str
    at: float  # planned seconds after the start
    sent: float = 0.0  # seconds after the start, actual
    done: float | None = None
    status: int = 0  # 0: no answer (cancelled at the end, or a client error)
    retry_after: str | None = None
    error: str = ""


def body(prompt: str, max_tokens: int) -> dict:
    return {"model": BASE_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


async def send(client: Http, o: Outcome, prompt: str, max_tokens: int, start: float) -> None:
    """Sends one request, filling in `o`."""
    o.sent = time.perf_counter() - start
    try:
        status, headers, data = await client.request(
            "POST", client.prefix + "/completions", body(prompt, max_tokens), f"sk-{o.tenant}"
        )
        o.done, o.status = time.perf_counter() - start, status
        o.retry_after = headers.get("retry-after")
        if status != 200:
            try:
                o.error = json.loads(data)["error"]["message"][:160]
            except (ValueError, KeyError, TypeError):
                o.error = data[:160].decode("latin-1")
    except (OSError, ValueError, IndexError) as error:
        o.error = f"{type(error).__name__}: {error}"[:160]


async def capacity(url: str, clients: int, seconds: float, warmup: float, max_tokens: int, texts: list[str]) -> dict:
    """Completions/s of `clients` closed-loop clients (tenants in turn), counted after `warmup` s. Each
    client's first request asks for a random number of tokens, so that the rows of the batch are
    staggered as under open-loop arrivals: clients all starting together would keep joining and
    leaving in waves of equal lengths, which the paged K/V gather (padded to the longest row) serves
    about 1.3x faster than the spread of lengths arrivals give (measured here: 19.2 vs 14-15/s)."""
    client = Http(url)
    start = time.perf_counter()
    finished: list[tuple[float, float]] = []  # (sent, done) of 200s
    statuses = Counter()
    tenants = list(TENANTS)

    async def worker(k: int) -> None:
        rng = random.Random(k)
        tokens = rng.randint(1, max_tokens)
        while time.perf_counter() - start < warmup + seconds:
            o = Outcome(tenants[k % len(tenants)], 0.0)
            await send(client, o, rng.choice(texts), tokens, start)
            tokens = max_tokens
            statuses[o.status] += 1
            if o.status == 200:
                finished.append((o.sent, o.done))
            else:
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker(k) for k in range(clients)))
    counted = [(s, d) for s, d in finished if warmup <= d <= warmup + seconds]
    latency = [d - s for s, d in counted]
    return {
        "clients": clients,
        "seconds": seconds,
        "completions": len(counted),
        "per_s": len(counted) / seconds,
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def arrivals(rate: float, seconds: float, seed: int, texts: list[str]) -> list[tuple[Outcome, str]]:
    """Poisson arrivals of each tenant at its share of `rate`, merged in time order, with their prompts."""
    planned = []
    total = sum(TENANTS.values())
    for k, (tenant, weight) in enumerate(TENANTS.items()):
        rng, t = random.Random(seed * 1000 + k), 0.0
        while True:
            t += rng.expovariate(rate * weight / total)
            if t >= seconds:
                break
            planned.append((Outcome(tenant, t), rng.choice(texts)))
    return sorted(planned, key=lambda p: p[0].at)


async def open_loop(url: str, planned: list[tuple[Outcome, str]], seconds: float, grace: float, max_tokens: int):
    """Sends `planned` on schedule whatever the server does; waits at most `grace` s after the last
    arrival, then cancels what is left. Samples /health (queue depth) every second meanwhile."""
    depth: list[tuple[float, int, int]] = []
    client = Http(url)
    start = time.perf_counter()

    async def watch() -> None:
        while True:
            try:
                h = json.loads((await asyncio.wait_for(client.request("GET", "/health"), 60))[2])
                depth.append((time.perf_counter() - start, h["queue_depth"], h["running_rows"]))
            except (OSError, ValueError, KeyError, IndexError, TimeoutError):
                pass
            await asyncio.sleep(1.0)

    watcher = asyncio.create_task(watch())
    tasks, late = [], []
    for o, prompt in planned:
        delay = start + o.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late.append(-delay)
        tasks.append(asyncio.create_task(send(client, o, prompt, max_tokens, start)))
    left = start + seconds + grace - time.perf_counter()
    _, pending = await asyncio.wait(tasks, timeout=max(left, 0.0))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    end = time.perf_counter() - start
    watcher.cancel()
    outcomes = [o for o, _ in planned]
    for o in outcomes:
        if o.done is None and not o.error:
            o.error, o.done = "unfinished", None
    return outcomes, end, depth, late


def summarize(outcomes: list[Outcome], seconds: float, end: float, depth, late) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    unfinished = [o for o in outcomes if o.error == "unfinished"]
    refused = [o for o in outcomes if o.status == 429]
    latency = [o.done - o.sent for o in ok]
    span = max(o.done for o in ok) - min(o.sent for o in outcomes) if ok else math.nan  # first send to last answer
    bounded = latency + [end - o.sent for o in unfinished]  # unfinished at their age: a lower bound
    windows = []
    for w in range(math.ceil(seconds / WINDOW)):
        lo, hi = w * WINDOW, (w + 1) * WINDOW
        inside = [o for o in ok if lo <= o.sent < hi]
        ages = [o.done - o.sent for o in inside] + [end - o.sent for o in unfinished if lo <= o.sent < hi]
        windows.append(
            {
                "from_s": lo,
                "admitted": len(inside),
                "unfinished": sum(lo <= o.sent < hi for o in unfinished),
                "p50_s": percentile(ages, 50),
                "p99_s": percentile(ages, 99),
            }
        )
    tenants = {}
    for tenant in TENANTS:
        mine = [o for o in outcomes if o.tenant == tenant]
        served = [o for o in ok if o.tenant == tenant]
        lat = [o.done - o.sent for o in served]
        tenants[tenant] = {
            "sent": len(mine),
            "completed": len(served),
            "refused_429": sum(o.status == 429 for o in mine),
            "unfinished": sum(o.error == "unfinished" for o in mine),
            "completed_per_s": len(served) / span,
            "share_of_completed": len(served) / len(ok) if ok else math.nan,
            "completed_of_sent": len(served) / len(mine) if mine else math.nan,
            "latency_p50_s": percentile(lat, 50),
            "latency_p99_s": percentile(lat, 99),
        }
    statuses = Counter(str(o.status) if o.status else ("unfinished" if o.error == "unfinished" else "error")
                       for o in outcomes)  # fmt: skip
    retry = Counter(o.retry_after for o in refused)
    return {
        "sent": len(outcomes),
        "offered_per_s": len(outcomes) / seconds,
        "sending_late_p99_s": percentile(late, 99) if late else 0.0,
        "statuses": dict(statuses),
        "completed": len(ok),
        "completed_per_s": len(ok) / span,
        "span_s": span,
        "unfinished": len(unfinished),
        "share_429": len(refused) / len(outcomes) if outcomes else math.nan,
        "429_without_retry_after": sum(not o.retry_after for o in refused),
        "retry_after_values": dict(sorted(retry.items(), key=lambda kv: str(kv[0]))),
        "5xx": sum(o.status >= 500 for o in outcomes),
        "client_errors": Counter(o.error.split(":")[0] for o in outcomes if o.status == 0 and o.error != "unfinished"),
        "errors": sorted({o.error for o in outcomes if o.status not in (200, 429) and o.error != "unfinished"})[:5],
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "latency_max_s": max(latency, default=math.nan),
        "latency_p99_with_unfinished_s": percentile(bounded, 99),
        "lower_bound": bool(unfinished),
        "queue_depth_max": max((d for _, d, _ in depth), default=0),
        "queue_depth": [(round(t, 1), d, r) for t, d, r in depth],
        "windows": windows,
        "tenants": tenants,
    }


def render(result: dict) -> str:
    a, cap = result["args"], result["capacity"]
    one, bounded, unbounded = result["1x"], result["3x_bounded"], result["3x_unbounded"]
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731

    def ratio(x: dict, y: dict) -> float:
        return x["latency_p99_with_unfinished_s"] / y["latency_p99_with_unfinished_s"]

    def p99(s: dict) -> str:
        return (">= " if s["lower_bound"] else "") + fmt(s["latency_p99_with_unfinished_s"])

    lines = [
        f"## overload ({result['date']})",
        "",
        f"Machine: {result['machine']}; adapterhub at {result['revision']}. "
        f"Model: the tests' tiny llama (2 layers, hidden 32, character tokenizer; "
        f"context widened to 1024), 1 torch thread, `--max-batch 64`. Requests: greedy, ignore_eos, "
        f"{a['max_tokens']} tokens, 16-character prompts, not streamed; latency to the whole answer. Tenants send "
        f"5:1:1 (heavy, light1, light2), Poisson arrivals each.",
        "",
        f"Capacity ({cap['clients']} closed-loop clients, rows staggered, {cap['seconds']:.0f} s, bounded server): "
        f"**{cap['per_s']:.1f} completions/s** (latency p50 {cap['latency_p50_s']:.2f} s, p99 "
        f"{cap['latency_p99_s']:.2f} s). Offered: 1x = {one['offered_per_s']:.1f}/s, 3x = "
        f"{bounded['offered_per_s']:.1f}/s (sent), {a['seconds']:.0f} s of arrivals each; the unbounded run "
        f"waits {a['grace']:.0f} s after the last arrival, then cancels what is left.",
        "",
        "| | 1x, bounded | 3x, bounded (`--max-queue " + str(a["max_queue"]) + "`) | 3x, unbounded queue | "
        "unbounded / bounded |",
        "|---|---|---|---|---|",
        f"| completed / sent | {one['completed']} / {one['sent']} | {bounded['completed']} / {bounded['sent']} | "
        f"{unbounded['completed']} / {unbounded['sent']} | |",
        f"| completions/s (first send to last answer) | {one['completed_per_s']:.1f} | "
        f"{bounded['completed_per_s']:.1f} | "
        f"{unbounded['completed_per_s']:.1f} | {unbounded['completed_per_s'] / bounded['completed_per_s']:.2f}x |",
        f"| latency p50 s (admitted) | {fmt(one['latency_p50_s'])} | {fmt(bounded['latency_p50_s'])} | "
        f"{fmt(unbounded['latency_p50_s'])} | {unbounded['latency_p50_s'] / bounded['latency_p50_s']:.1f}x |",
        f"| latency p99 s (admitted; unfinished at their age) | {p99(one)} | {p99(bounded)} | {p99(unbounded)} | "
        f"{'>= ' if unbounded['lower_bound'] else ''}"
        f"{unbounded['latency_p99_with_unfinished_s'] / bounded['latency_p99_with_unfinished_s']:.1f}x |",
        f"| p99 / p99 at 1x | 1.0x | {ratio(bounded, one):.1f}x | {'>= ' if unbounded['lower_bound'] else ''}"
        f"{ratio(unbounded, one):.1f}x | |",
        f"| unfinished at the end (cancelled) | {one['unfinished']} | {bounded['unfinished']} | "
        f"{unbounded['unfinished']} | |",
        f"| 429 share | {one['share_429']:.1%} | {bounded['share_429']:.1%} | {unbounded['share_429']:.1%} | |",
        f"| 429 without Retry-After | {one['429_without_retry_after']} | {bounded['429_without_retry_after']} | "
        f"{unbounded['429_without_retry_after']} | |",
        f"| 5xx | {one['5xx']} | {bounded['5xx']} | {unbounded['5xx']} | |",
        f"| queue depth, max | {one['queue_depth_max']} | {bounded['queue_depth_max']} | "
        f"{unbounded['queue_depth_max']} | |",
        "",
        "Per tenant at 3x (completed/s, first send to last answer; share of all completed; completed of sent; "
        "latency p99 s):",
        "",
        "| tenant (arrival share) | bounded | unbounded |",
        "|---|---|---|",
    ]
    for tenant, weight in TENANTS.items():
        b, u = bounded["tenants"][tenant], unbounded["tenants"][tenant]
        cell = lambda t: (  # noqa: E731
            f"{t['completed_per_s']:.1f}/s; {t['share_of_completed']:.0%}; {t['completed']}/{t['sent']} "
            f"({t['completed_of_sent']:.0%}); {fmt(t['latency_p99_s'])}"
        )
        lines.append(f"| {tenant} ({weight}/{sum(TENANTS.values())}) | {cell(b)} | {cell(u)} |")
    lines += [
        "",
        f"p99 latency by {WINDOW:.0f}-s window of sending time (s; unbounded: unfinished at their age):",
        "",
        "| sent from s | 1x, bounded | 3x, bounded | 3x, unbounded |",
        "|---|---|---|---|",
    ]
    for w1, wb, wu in zip(one["windows"], bounded["windows"], unbounded["windows"]):
        lines.append(
            f"| {w1['from_s']:.0f} | {fmt(w1['p99_s'])} | {fmt(wb['p99_s'])} | "
            f"{'>= ' if wu['unfinished'] else ''}{fmt(wu['p99_s'])} |"
        )
    lines += ["", f"Retry-After values at 3x, bounded (seconds: count): {bounded['retry_after_values']}."]
    for name in ("1x", "3x_bounded", "3x_unbounded"):
        if result[name]["errors"]:
            lines.append(f"Errors ({name}): {result[name]['errors']}")
    lines.append("")
    lines.append("What else ran (other processes' cores on average, load average at the end, busiest others):")
    for name, w in result["load"].items():
        lines.append(
            f"- {name}: {w['other_cores']} of {w['cpus']} cores (this benchmark and the server {w['ours_cores']}); "
            f"load {' '.join(w['loadavg'])}; " + ("; ".join(f"`{p}`" for p in w["busiest_others"][:2]) or "none")
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", dest="max_tokens", type=int, default=512)
    parser.add_argument("--clients", type=int, default=96, help="closed-loop clients measuring capacity")
    parser.add_argument("--capacity-seconds", dest="capacity_seconds", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=90.0, help="seconds of open-loop arrivals per run")
    parser.add_argument(
        "--grace",
        type=float,
        help="seconds after the last arrival before cancelling what is left (default: room for the unbounded "
        "server's backlog, (factor - 1) x 1.25 x --seconds + 30)",
    )
    parser.add_argument("--factor", type=float, default=3.0, help="overload: this times the capacity")
    parser.add_argument("--max-queue", dest="max_queue", type=int, default=64, help="the bounded server's --max-queue")
    parser.add_argument("--rate", type=float, help="skip the capacity measurement: use this completions/s as 1x")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.grace is None:
        args.grace = (args.factor - 1) * 1.25 * args.seconds + 30

    import torch

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="adapterhub-overload-"))
    texts = prompts(256, 16, seed=args.seed)
    result: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "revision": revision(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load": {},
    }
    try:
        base = write_base(root, context=1024)
        keys = keys_file(root / "keys.json", [f"sk-{t}" for t in TENANTS], [BASE_NAME])

        def server(*queue: str):
            return start_server("overload", serve_command(base, "--api-key", str(keys), *queue))

        bounded = server("--max-queue", str(args.max_queue))
        try:
            watch = CpuWatch([bounded.process.pid]).start()
            if args.rate:
                result["capacity"] = {"clients": 0, "seconds": 0, "per_s": args.rate, "latency_p50_s": math.nan,
                                      "latency_p99_s": math.nan, "given": True}  # fmt: skip
            else:
                result["capacity"] = asyncio.run(
                    capacity(bounded.url, args.clients, args.capacity_seconds, 10.0, args.max_tokens, texts)
                )
            rate = result["capacity"]["per_s"]
            print(f"capacity: {rate:.1f} completions/s ({result['capacity']})", flush=True)
            result["load"]["capacity"] = watch.stop()
            for name, factor in (("1x", 1.0), ("3x_bounded", args.factor)):
                watch = CpuWatch([bounded.process.pid]).start()
                planned = arrivals(rate * factor, args.seconds, args.seed + (factor != 1.0), texts)
                outcomes, end, depth, late = asyncio.run(
                    open_loop(bounded.url, planned, args.seconds, args.grace, args.max_tokens)
                )
                result[name] = summarize(outcomes, args.seconds, end, depth, late)
                result["load"][name] = watch.stop()
                print(name, {k: v for k, v in result[name].items() if k not in ("queue_depth", "windows")}, flush=True)
                time.sleep(3.0)
        finally:
            bounded.stop()
        unbounded = server("--max-queue", "1000000", "--max-queue-tokens", "1000000000")
        try:
            watch = CpuWatch([unbounded.process.pid]).start()
            planned = arrivals(rate * args.factor, args.seconds, args.seed + 1, texts)
            outcomes, end, depth, late = asyncio.run(
                open_loop(unbounded.url, planned, args.seconds, args.grace, args.max_tokens)
            )
            result["3x_unbounded"] = summarize(outcomes, args.seconds, end, depth, late)
            result["load"]["3x_unbounded"] = watch.stop()
            print(
                "3x_unbounded", {k: v for k, v in result["3x_unbounded"].items() if k not in ("queue_depth", "windows")}
            )
        finally:
            unbounded.stop()
        text = render(result)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"overload-{result['date']}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {stem}.md and .json")
        bad = result["3x_bounded"]["5xx"] or result["3x_bounded"]["429_without_retry_after"]
        return 1 if bad else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
