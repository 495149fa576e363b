"""lora_linear on an NVIDIA GPU (issues 4 and 19), bf16, against the memory floor and its peers.

Every number comes from one run on one card. A timing is the median over calls, each between
CUDA events and each after an L2 flush that only reads: a reduction to one scalar, kept on the
device, of a buffer 4x the L2 size (L2_cache_size; 256 MiB when unknown). The flush leaves no
dirty line for the timed call to write back, and nothing syncs with the host inside the timing.
The flush is queued ahead of each call, so an eager call's host launch cost shows in its device
time only where it exceeds the flush's device time (printed); "eager host" shows it apart.

  peak    bytes read + written / time of a device-to-device copy of 1 GiB, measured in this run
  floor   (W bytes + each distinct adapter's bytes once, A and B at the rank in use) / peak;
          x, y and the intermediate t are left out (issue 19's definition)

Decode sweep. Workloads (Punica's): distinct (each row its own adapter), uniform (rows draw from
64 adapters uniformly), skewed (Zipf, alpha 1.5, over 64 adapters), identical (one adapter).
Columns:
  adapters        distinct adapters among the rows (what the floor counts)
  base            x @ W.T alone (F.linear, cuBLAS), called eagerly
  ours eager      adapterhub.ops.lora_linear called eagerly
  eager host      the host's time to issue that eager call (median; it includes any wait for the
                  device): where it exceeds ours graph, eager decode is bound by the host
  ours graph      the same call replayed from a CUDA graph (no launch overhead; how decode is served)
  fallback        adapterhub.ops.reference.lora_linear (pure PyTorch, one pair of matmuls per slot)
  PEFT loop       PEFT's mixed-batch loop: per unique adapter, gather rows, two matmuls, add back
  floor           as above
  graph / floor   ours graph / floor (1.0 = at the floor)
  % peak          (W + adapter bytes) / ours graph / peak, = 100 / (graph / floor)
  base % peak     W bytes / base / peak: how close cuBLAS alone gets to the same bandwidth
  PEFT / ours     PEFT loop / ours graph
  ok              ours matches the fallback within bf16 tolerance

Decode launches, at the decode target's shape: base, lora_shrink alone, lora_expand alone, the two
back to back, and lora_linear (base + both), eager and graph, each against the floor of its own
weight bytes (W, A, B): the graph times, free of launch overhead, say what a fused shrink+expand
kernel could save at most (the pair's time minus the floor of the A and B bytes).

Prefill, 4096x4096, r = 16: 512 or 4096 tokens in 1, 4 or 16 contiguous segments (one adapter
each). The LoRA delta y += scale * (x @ A.T) @ B.T, every column replayed from a CUDA graph:
  base            x @ W.T (F.linear)
  ours            lora_linear; ours / base is the prefill target
  ours delta      lora_delta: shrink then expand as one op (our SGMV kernels), what the layers call
  grouped         torch._grouped_mm twice (CUTLASS or cuBLASLt grouped GEMM, by build) over the tokens
                  grouped by adapter (contiguous here, so no permutation), the used slots' A and B
                  gathered per call, then y += the result (_grouped_mm cannot accumulate into y)
  +gather/scatter the same with the tokens gathered into adapter order and index_add_-ed back: the
                  cost when a batch's tokens are not grouped by adapter
  mm loop         one torch.mm + addmm_ per segment (host-known segment bounds)
  max err         per method, max |delta - float64 reference| / max |reference|; each alternative
                  is checked (<= 1/32) before it is timed, and one that fails or cannot run shows
                  n/a and why. The rule printed under the table says which method to choose by shape.

Targets (issue 19; printed as met or not met, never failing the script):
  decode 64 rows x 64 distinct rank-16 adapters, 4096x4096: ours graph <= 1.2x floor and >= 70% of peak
  prefill 4096 tokens, one rank-16 adapter, 4096x4096: lora_linear (graph) <= 1.05x the base GEMM (graph)

A section that raises is reported under the tables and the run goes on; the exit status is then 1.

Usage, from the repository root:
  python -m bench.bench_gpu [--out FILE]   default $OUT/bench_gpu.md, else bench/results/bench_gpu.md
  python -m bench.bench_gpu --quick        tiny shapes (a smoke test of a few seconds)
  python -m bench.bench_gpu --dry-run      = --device cpu --quick: the whole script on the CPU, timed with
                                           time.perf_counter, no CUDA graphs (tests/test_bench_gpu.py runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import time
import traceback
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from adapterhub import ops
from adapterhub.ops import reference

DTYPE = torch.bfloat16
ELEM = torch.finfo(DTYPE).bits // 8  # bytes per element
ALL_WORKLOADS = ("distinct", "uniform", "skewed", "identical")
REL_TOL = 2**-5  # max |delta - float64 reference| / max |reference| accepted for a bf16 delta


@dataclasses.dataclass(frozen=True)
class Config:
    """What one run measures."""

    sweep: dict  # (in, out) -> (ranks, rows list, workloads)
    slots: int  # slots held on the device (distinct with N rows needs N)
    pool: int  # adapters that uniform and skewed draw from
    decode: tuple  # (in, out, rank, rows, workload) of the decode target
    prefill: tuple  # (in, out, rank)
    prefill_tokens: tuple
    prefill_adapters: tuple
    copy_bytes: int  # source size of the bandwidth copy
    flush_bytes: int  # 0: 4x the L2 size (256 MiB when unknown)
    budget_s: float  # time spent on one timing, roughly
    max_reps: int


FULL = Config(
    sweep={
        (4096, 4096): ((16, 64), (1, 16, 64, 256), ALL_WORKLOADS),
        (4096, 11008): ((16, 64), (1, 64, 256), ("distinct", "skewed")),
        (11008, 4096): ((16, 64), (1, 64, 256), ("distinct", "skewed")),
    },
    slots=256,
    pool=64,
    decode=(4096, 4096, 16, 64, "distinct"),
    prefill=(4096, 4096, 16),
    prefill_tokens=(512, 4096),
    prefill_adapters=(1, 4, 16),
    copy_bytes=1 << 30,
    flush_bytes=0,
    budget_s=0.12,
    max_reps=40,
)
QUICK = Config(
    sweep={(64, 128): ((8,), (1, 8), ALL_WORKLOADS), (128, 64): ((8,), (8,), ("distinct", "skewed"))},
    slots=16,
    pool=8,
    decode=(64, 128, 8, 8, "distinct"),
    prefill=(64, 128, 8),
    prefill_tokens=(32, 128),
    prefill_adapters=(1, 4),
    copy_bytes=8 << 20,
    flush_bytes=4 << 20,
    budget_s=0.01,
    max_reps=3,
)


# ---- workloads and routing (CPU) ----


def routing(workload: str, rows: int, g: torch.Generator, slots: int = 256, pool: int = 64) -> torch.Tensor:
    """index (rows,) int64 on the CPU."""
    if workload == "distinct":
        if rows > slots:
            raise ValueError(f"distinct needs {rows} slots, have {slots}")
        return torch.randperm(slots, generator=g)[:rows]
    if workload == "uniform":
        return torch.randint(0, pool, (rows,), generator=g)
    if workload == "skewed":
        weights = torch.arange(1, pool + 1, dtype=torch.float64) ** -1.5
        return torch.multinomial(weights, rows, replacement=True, generator=g)
    if workload == "identical":
        return torch.zeros(rows, dtype=torch.int64)
    raise ValueError(workload)


def segmented_index(tokens: int, slot_ids: list[int]) -> torch.Tensor:
    """index (tokens,): len(slot_ids) contiguous segments, as equal as can be, in the order given."""
    n = len(slot_ids)
    sizes = [tokens // n + (1 if i < tokens % n else 0) for i in range(n)]
    return torch.tensor(slot_ids, dtype=torch.int64).repeat_interleave(torch.tensor(sizes))


def distinct_adapters(index: torch.Tensor) -> int:
    """Adapters (slots >= 0) the rows use, each counted once."""
    return len({s for s in index.flatten().tolist() if s >= 0})


# ---- the floor (CPU arithmetic) ----


def weight_bytes(in_f: int, out_f: int, elem: int = ELEM) -> int:
    return in_f * out_f * elem


def adapter_bytes(distinct: int, rank: int, in_f: int, out_f: int, elem: int = ELEM) -> int:
    """A (rank, in) and B (out, rank) of each distinct adapter, once."""
    return distinct * rank * (in_f + out_f) * elem


def floor_seconds(in_f: int, out_f: int, rank: int, distinct: int, peak: float, elem: int = ELEM) -> float:
    """(W + adapter bytes) / peak bytes per second."""
    return (weight_bytes(in_f, out_f, elem) + adapter_bytes(distinct, rank, in_f, out_f, elem)) / peak


def pct_of_peak(nbytes: float, seconds: float, peak: float) -> float:
    """100 * (nbytes / seconds) / peak."""
    return 100.0 * nbytes / seconds / peak


# ---- the LoRA delta by grouped GEMM and by a per-segment loop (device-agnostic) ----


@dataclasses.dataclass(frozen=True)
class Grouping:
    """Rows grouped by adapter, computed once per batch (shared by every layer)."""

    perm: torch.Tensor  # (n,) int64: rows in adapter order (rows with -1 left out)
    row_slot: torch.Tensor  # (n,) int64: slot of each row of perm
    slots: torch.Tensor  # (G,) int64: the groups' slots
    offs: torch.Tensor  # (G,) int32: cumulative ends of the groups in perm (torch._grouped_mm's offs)
    segments: tuple  # ((start, end, slot), ...) the groups on the host, positions in perm
    presorted: bool  # every row has an adapter and each adapter's rows are one run: perm = arange

    def to(self, device) -> Grouping:
        move = {f: getattr(self, f).to(device) for f in ("perm", "row_slot", "slots", "offs")}
        return dataclasses.replace(self, **move)


def grouping(index: torch.Tensor) -> Grouping:
    """index (rows,) on the CPU -> Grouping. Runs are kept in their order when each adapter is one run;
    otherwise the rows are sorted (stably) by slot."""
    idx = index.tolist()
    runs: list[list[int]] = []  # [slot, start, end]
    for i, s in enumerate(idx):
        if runs and runs[-1][0] == s:
            runs[-1][2] = i + 1
        else:
            runs.append([s, i, i + 1])
    used = [r for r in runs if r[0] >= 0]
    presorted = len(used) == len(runs) and len({r[0] for r in used}) == len(used)
    if presorted:
        order = list(range(len(idx)))
        groups = [(s, end - start) for s, start, end in used]
    else:
        order = sorted((i for i, s in enumerate(idx) if s >= 0), key=lambda i: idx[i])
        groups = []
        for i in order:
            if groups and groups[-1][0] == idx[i]:
                groups[-1] = (idx[i], groups[-1][1] + 1)
            else:
                groups.append((idx[i], 1))
    segments, start = [], 0
    for s, n in groups:
        segments.append((start, start + n, s))
        start += n
    return Grouping(
        perm=torch.tensor(order, dtype=torch.int64),
        row_slot=torch.tensor([idx[i] for i in order], dtype=torch.int64),
        slots=torch.tensor([s for s, _ in groups], dtype=torch.int64),
        offs=torch.tensor([end for _, end, _ in segments], dtype=torch.int32),
        segments=tuple(segments),
        presorted=presorted,
    )


def grouped_delta(y, x, A, B, scale, plan: Grouping, grouped_mm=None) -> None:
    """y (rows, out) += scale[s] * (x @ A[s].T) @ B[s].T per row by two grouped GEMMs, in place;
    rows outside plan untouched. A (slots, R, in), B (slots, out, R), scale (slots,)."""
    mm = grouped_mm or torch._grouped_mm
    xs = x if plan.presorted else x.index_select(0, plan.perm)  # (n, in)
    At = A.index_select(0, plan.slots).transpose(1, 2)  # (G, in, R), column-major
    Bt = B.index_select(0, plan.slots).transpose(1, 2)  # (G, R, out), column-major
    t = mm(xs, At, offs=plan.offs)  # (n, R)
    t = t * scale.index_select(0, plan.row_slot).to(t.dtype).unsqueeze(1)
    d = mm(t, Bt, offs=plan.offs)  # (n, out)
    if plan.presorted:
        y += d
    else:
        y.index_add_(0, plan.perm, d)


def segment_loop_delta(y, x, A, B, scales: list[float], plan: Grouping) -> None:
    """The same delta with one torch.mm and one addmm_ per group (bounds known on the host)."""
    if plan.presorted:
        for start, end, s in plan.segments:
            y[start:end].addmm_(x[start:end] @ A[s].T, B[s].T, alpha=scales[s])
        return
    xs = x.index_select(0, plan.perm)
    d = y.new_zeros(xs.size(0), y.size(1))
    for start, end, s in plan.segments:
        d[start:end].addmm_(xs[start:end] @ A[s].T, B[s].T, alpha=scales[s])
    y.index_add_(0, plan.perm, d)


def reference_delta64(x, A, B, scale, index) -> torch.Tensor:
    """float64 oracle of the delta, (rows, out), on x's device."""
    d = torch.zeros(x.size(0), B.size(1), dtype=torch.float64, device=x.device)
    for s in torch.unique(index[index >= 0]).tolist():
        rows = (index == s).nonzero().flatten()
        d[rows] = float(scale[s]) * (x[rows].double() @ A[s].double().T) @ B[s].double().T
    return d


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---- rendering and verdicts (CPU) ----


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row of {len(row)} cells under {len(header)} columns: {row}")
    cell = lambda s: str(s).replace("|", "/").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def us(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    v = seconds * 1e6
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def decode_target_lines(label: str, graph_s: float, floor_s: float, eager_s: float) -> list[str]:
    ratio, pct = graph_s / floor_s, 100.0 * floor_s / graph_s
    return [
        f"- decode, {label}: ours (graph) {us(graph_s)} µs = {ratio:.2f}x the floor ({us(floor_s)} µs): "
        f"target <= 1.2x, {verdict(ratio <= 1.2)}",
        f"- decode, {label}: {pct:.0f}% of peak bandwidth over W + adapter bytes: target >= 70%, "
        f"{verdict(pct >= 70)} (eager: {us(eager_s)} µs, {100.0 * floor_s / eager_s:.0f}%)",
    ]


def prefill_target_line(label: str, ours_s: float, base_s: float) -> str:
    ratio = ours_s / base_s
    return (
        f"- prefill, {label}: lora_linear {us(ours_s)} µs = {ratio:.3f}x the base GEMM ({us(base_s)} µs): "
        f"target <= 1.05x, {verdict(ratio <= 1.05)}"
    )


def prefill_rule(points: list[tuple[int, float, dict[str, float | None]]]) -> str:
    """points: (tokens per adapter, ours delta seconds, {alternative: seconds or None}) per shape.
    Says which to choose by shape: a threshold on tokens per adapter where one separates them."""
    judged = []  # (tokens per adapter, the fastest alternative when it beats ours, else None)
    for tpa, ours_s, alts in points:
        timed = {k: v for k, v in alts.items() if v is not None}
        best = min(timed, key=timed.get) if timed else None
        judged.append((tpa, best if best is not None and timed[best] < ours_s else None))
    winners = sorted({name for _, name in judged if name})
    if not winners:
        return "SGMV (ours) is fastest at every measured shape: keep it for prefill."
    alt = winners[0] if len(winners) == 1 else f"cuBLAS ({' or '.join(winners)}, whichever is faster)"
    threshold = min(tpa for tpa, name in judged if name)
    if not all((name is not None) == (tpa >= threshold) for tpa, name in judged):
        per_shape = ", ".join(f"{tpa}: {name or 'SGMV'}" for tpa, name in sorted(judged, key=lambda point: point[0]))
        return f"no clean threshold on tokens per adapter (fastest by tokens/adapter: {per_shape})."
    losers = [tpa for tpa, name in judged if name is None]
    if not losers:
        return f"{alt} at every measured shape (tokens/adapter >= {threshold}); SGMV never wins here."
    return f"{alt} when tokens/adapter >= {threshold}, SGMV (ours) at or below {max(losers)}."


# ---- timing (device) ----


class Timer:
    """Median seconds of fn over calls, each after a read-only flush of the cache; host_s: the median
    host time of issuing one call (its launch cost, for calls that do not wait for the device)."""

    def __init__(self, device: torch.device, flush_bytes: int, budget_s: float, max_reps: int):
        self.device, self.budget_s, self.max_reps = device, budget_s, max_reps
        self.cuda = device.type == "cuda"
        self.flush_buf = torch.zeros(flush_bytes // 4, dtype=torch.float32, device=device)
        self.host_s = 0.0
        self.sink = torch.zeros((), dtype=torch.float32, device=device)

    def flush(self) -> None:
        torch.sum(self.flush_buf, 0, out=self.sink)  # reads the whole buffer, writes one scalar

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable, max_reps: int | None = None, flush: bool = True) -> float:
        max_reps = max_reps or self.max_reps
        fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        once = max(time.perf_counter() - t0, 1e-6)
        reps = int(min(max_reps, max(min(5, max_reps), self.budget_s / once)))
        if not self.cuda:
            times = []
            for _ in range(reps):
                if flush:
                    self.flush()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            self.host_s = statistics.median(times)
            return self.host_s
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        host = []
        for start, end in events:
            if flush:
                self.flush()
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
            end.record()
        torch.cuda.synchronize()
        self.host_s = statistics.median(host)
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e-3


def graphed(fn: Callable, device: torch.device) -> Callable:
    """fn captured into a CUDA graph; returns its replay (fn itself on the CPU)."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"


def try_graphed(fn: Callable, device: torch.device) -> tuple[Callable, str]:
    """(replay, "graph"), or (fn, "eager (why)") when fn syncs with the host or cannot be captured."""
    if device.type != "cuda":
        return fn, "eager"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        return fn, f"eager ({short(e)})"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    try:
        return graphed(fn, device), "graph"
    except RuntimeError as e:
        torch.cuda.synchronize()
        return fn, f"eager (capture failed: {short(e)})"


def peak_bandwidth(timer: Timer, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy of nbytes, counting bytes read and written."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src), max_reps=10, flush=False)
    return 2 * nbytes / seconds


def card(device: torch.device) -> str:
    if device.type != "cuda":
        return (
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores; no CUDA graphs: the "
            f"graph columns time eager calls); torch {torch.__version__}"
        )
    props = torch.cuda.get_device_properties(device)
    try:
        driver = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    l2 = getattr(props, "L2_cache_size", 0)
    return (
        f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
        f"L2 {l2 / 2**20:.0f} MiB; driver {driver}; CUDA {torch.version.cuda}; torch {torch.__version__}"
    )


def flush_size(cfg: Config, device: torch.device) -> int:
    if cfg.flush_bytes:
        return cfg.flush_bytes
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) if device.type == "cuda" else 0
    return 4 * l2 if l2 else 256 << 20


def randn(shape, std: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.randn(shape, generator=g, device=device) * std).to(DTYPE)


def peft_loop(x, W, A, B, scales: list[float], names: list[int]):
    """PEFT's LoRA _mixed_batch_forward: adapter names arrive as a Python list, one sub-batch per name."""
    y = F.linear(x, W)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        y[rows] += (x[rows] @ A[name].T @ B[name].T) * scales[name]
    return y


# ---- the three sections (device) ----


def sweep_case(timer, device, peak, W, A, B, scale, rank, rows, workload, cfg: Config, seed: int) -> dict:
    out_f, in_f = W.shape
    g = torch.Generator().manual_seed(seed)
    index_cpu = routing(workload, rows, g, cfg.slots, cfg.pool)
    index = index_cpu.to(device)
    x = randn((rows, in_f), 1.0, torch.Generator(device=device).manual_seed(seed), device)
    names, scales = index_cpu.tolist(), scale.tolist()
    distinct = distinct_adapters(index_cpu)

    ours = ops.lora_linear(x, W, None, A, B, scale, index)
    expected = reference.lora_linear(x, W, None, A, B, scale, index)
    ok = torch.allclose(ours.float(), expected.float(), rtol=3e-2, atol=3e-2)
    s = {
        "base": timer(lambda: F.linear(x, W)),
        "eager": timer(lambda: ops.lora_linear(x, W, None, A, B, scale, index)),
        "host": timer.host_s,
        "graph": timer(graphed(lambda: ops.lora_linear(x, W, None, A, B, scale, index), device)),
        "fallback": timer(lambda: reference.lora_linear(x, W, None, A, B, scale, index)),
        "peft": timer(lambda: peft_loop(x, W, A, B, scales, names)),
    }
    return dict(s, ok=ok, distinct=distinct, floor=floor_seconds(in_f, out_f, rank, distinct, peak))


SWEEP_HEADER = [
    "in->out",
    "r",
    "rows",
    "workload",
    "adapters",
    "base µs",
    "ours eager µs",
    "eager host µs",
    "ours graph µs",
    "fallback µs",
    "PEFT loop µs",
    "floor µs",
    "graph / floor",
    "% peak (graph)",
    "base % peak",
    "PEFT / ours graph",
    "ok",
]


def sweep_row(key: tuple, r: dict, peak: float) -> list[str]:
    in_f, out_f, rank, rows, workload = key
    return [
        f"{in_f}->{out_f}",
        str(rank),
        str(rows),
        workload,
        str(r["distinct"]),
        us(r["base"]),
        us(r["eager"]),
        us(r["host"]),
        us(r["graph"]),
        us(r["fallback"]),
        us(r["peft"]),
        us(r["floor"]),
        f"{r['graph'] / r['floor']:.2f}",
        f"{100 * r['floor'] / r['graph']:.0f}%",
        f"{pct_of_peak(weight_bytes(in_f, out_f), r['base'], peak):.0f}%",
        f"{r['peft'] / r['graph']:.1f}x",
        "yes" if r["ok"] else "NO",
    ]


def run_sweep(timer, device, peak, cfg: Config, results: dict) -> dict:
    """Fills results (key -> dict) as it goes, so that a failure keeps the rows before it."""
    print(markdown_table(SWEEP_HEADER, []).splitlines()[0], flush=True)
    for (in_f, out_f), (ranks, rows_list, workloads) in cfg.sweep.items():
        g = torch.Generator(device=device).manual_seed(in_f * 100003 + out_f)
        W = randn((out_f, in_f), in_f**-0.5, g, device)
        for rank in ranks:
            A = randn((cfg.slots, rank, in_f), in_f**-0.5, g, device)
            B = randn((cfg.slots, out_f, rank), rank**-0.5, g, device)
            scale = torch.rand(cfg.slots, generator=g, device=device) + 0.5
            for rows in rows_list:
                for workload in workloads:
                    key = (in_f, out_f, rank, rows, workload)
                    seed = zlib.crc32(repr(key).encode())
                    results[key] = sweep_case(timer, device, peak, W, A, B, scale, rank, rows, workload, cfg, seed)
                    print(
                        markdown_table(SWEEP_HEADER, [sweep_row(key, results[key], peak)]).splitlines()[-1], flush=True
                    )
            del A, B
        del W
    return results


LAUNCH_HEADER = ["call", "weight bytes", "floor µs", "eager µs", "eager host µs", "graph µs", "graph / floor"]


def fused_decode_switch(device: torch.device) -> Callable[[str], str] | None:
    """adapterhub._C.set_cuda_decode ("fused" / "split", returns the previous mode) where lora_linear has a
    fused decode kernel: the CUDA build on sm_90+; None elsewhere."""
    if device.type != "cuda" or ops.backend() != "compiled" or torch.cuda.get_device_capability(device)[0] < 9:
        return None
    from adapterhub import _C

    return getattr(_C, "set_cuda_decode", None)


def fused_check(decode: Callable[[str], str], x, A, B, scale, index, out_f: int) -> str:
    """A sentence comparing the fused decode kernel's delta with the split one's (lora_delta into zeros)."""
    deltas = {}
    for mode in ("split", "fused"):
        decode(mode)
        y0 = torch.zeros(x.size(0), out_f, dtype=x.dtype, device=x.device)
        ops.lora_delta(y0, x, A, B, scale, index)
        deltas[mode] = y0.double()
    decode("split")
    if torch.equal(deltas["fused"], deltas["split"]):  # another summation order cannot give every bit
        return " Fused and split deltas are bit-identical: the fused kernel probably did not run (no sm_90 code?)."
    return f" Fused vs split deltas: max error {rel_err(deltas['fused'], deltas['split']):.1e} of the largest."


def time_launches(timer, device, peak, calls: dict, decode) -> tuple[dict, list]:
    """Each call eager and from a CUDA graph (a third element: the decode mode to time it in)."""
    res, rows_md = {}, []
    for name, (fn, nbytes, *mode) in calls.items():
        before = decode(mode[0]) if mode else None
        try:
            eager = timer(fn)
            host = timer.host_s
            graph = timer(graphed(fn, device))
        finally:
            if before is not None:
                decode(before)
        res[name] = dict(eager=eager, host=host, graph=graph, floor=nbytes / peak)
        rows_md.append(
            [
                name,
                f"{nbytes / 1e6:.2f} MB",
                us(nbytes / peak),
                us(eager),
                us(host),
                us(graph),
                f"{graph * peak / nbytes:.2f}",
            ]
        )
        print(f"launches: {name}: eager {us(eager)} µs, graph {us(graph)} µs", flush=True)
    return res, rows_md


def run_launches(timer, device, peak, cfg: Config) -> tuple[str, dict]:
    """The decode target's shape: each launch alone and together, eager and graph."""
    in_f, out_f, rank, rows, workload = cfg.decode
    g = torch.Generator(device=device).manual_seed(19)
    W = randn((out_f, in_f), in_f**-0.5, g, device)
    A = randn((cfg.slots, rank, in_f), in_f**-0.5, g, device)
    B = randn((cfg.slots, out_f, rank), rank**-0.5, g, device)
    scale = torch.rand(cfg.slots, generator=g, device=device) + 0.5
    index_cpu = routing(workload, rows, torch.Generator().manual_seed(19), cfg.slots, cfg.pool)
    index = index_cpu.to(device)
    x = randn((rows, in_f), 1.0, g, device)
    distinct = distinct_adapters(index_cpu)
    t = ops.lora_shrink(x, A, index)
    y = F.linear(x, W)
    a_b, b_b, w_b = distinct * rank * in_f * ELEM, distinct * out_f * rank * ELEM, weight_bytes(in_f, out_f)
    calls = {
        "base (x @ W.T)": (lambda: F.linear(x, W), w_b),
        "lora_shrink": (lambda: ops.lora_shrink(x, A, index), a_b),
        "lora_expand": (lambda: ops.lora_expand(y, t, B, scale, index), b_b),
        "lora_shrink + lora_expand": (
            lambda: ops.lora_expand(y, ops.lora_shrink(x, A, index), B, scale, index),
            a_b + b_b,
        ),
        "lora_delta (both as one op: what the adapted layers call)": (
            lambda: ops.lora_delta(y, x, A, B, scale, index),
            a_b + b_b,
        ),
        "lora_linear (base + both)": (lambda: ops.lora_linear(x, W, None, A, B, scale, index), w_b + a_b + b_b),
    }
    fused_note = ""
    decode = fused_decode_switch(device)
    initial = decode("split") if decode is not None else None  # the other rows time two launches, whatever the env
    try:
        if decode is not None:  # the fused decode kernel (sm_90+), checked against the split one first
            fused_note = fused_check(decode, x, A, B, scale, index, out_f)
            calls["lora_delta, fused decode kernel"] = (
                lambda: ops.lora_delta(y, x, A, B, scale, index),
                a_b + b_b,
                "fused",
            )
            calls["lora_linear, fused decode kernel"] = (
                lambda: ops.lora_linear(x, W, None, A, B, scale, index),
                w_b + a_b + b_b,
                "fused",
            )
        res, rows_md = time_launches(timer, device, peak, calls, decode)
    finally:
        if initial is not None:
            decode(initial)
    pair, lin, base = res["lora_shrink + lora_expand"], res["lora_linear (base + both)"], res["base (x @ W.T)"]
    sh, ex = res["lora_shrink"]["graph"], res["lora_expand"]["graph"]
    gain = max(0.0, pair["graph"] - pair["floor"])
    text = "\n\n".join(
        [
            f"Decode launches: {rows} rows x {distinct} {workload} rank-{rank} adapters, {in_f}->{out_f} "
            "(floor: the call's weight bytes / peak; eager host: the host's time to issue the eager call; the graph "
            "times have no launch overhead)",
            markdown_table(LAUNCH_HEADER, rows_md),
            f"Fused shrink+expand? The two launches back to back take {us(pair['graph'])} µs (graph); alone, "
            f"shrink {us(sh)} + expand {us(ex)} = {us(sh + ex)} µs. They read {(a_b + b_b) / 1e6:.2f} MB, a floor "
            f"of {us(pair['floor'])} µs, which a fused kernel reads too: fusing can save at most {us(gain)} µs "
            f"({100 * gain / lin['graph']:.0f}% of lora_linear's {us(lin['graph'])} µs). lora_linear - base = "
            f"{us(lin['graph'] - base['graph'])} µs (graph); base + pair, timed apart = "
            f"{us(base['graph'] + pair['graph'])} µs." + fused_note,
        ]
    )
    return text, res


PREFILL_HEADER = [
    "tokens",
    "adapters",
    "tokens/adapter",
    "base µs",
    "ours µs",
    "ours / base",
    "ours delta µs",
    "grouped µs",
    "grouped +gather/scatter µs",
    "mm loop µs",
    "fastest delta",
    "max err (ours, grouped, loop)",
]


def prefill_case(timer, device, W, A, B, scale, x, index_cpu: torch.Tensor) -> dict:
    """One prefill shape: each delta method checked against float64, then timed (graph where it can be)."""
    tokens, out_f = x.size(0), W.size(0)
    index = index_cpu.to(device)
    plan = grouping(index_cpu).to(device)
    unsorted_plan = dataclasses.replace(plan, presorted=False)  # gathers and scatters even when grouped
    scales = scale.tolist()
    grouped_mm = getattr(torch, "_grouped_mm", None)
    ref = reference_delta64(x, A, B, scale, index)
    y = F.linear(x, W)  # the delta methods add into this, as lora_expand does
    s, err, why = {}, {}, {}
    methods = {
        "ours": lambda y: ops.lora_delta(y, x, A, B, scale, index),
        "loop": lambda y: segment_loop_delta(y, x, A, B, scales, plan),
    }
    if grouped_mm is None:
        why["grouped"] = why["gather"] = "torch has no _grouped_mm"
    else:
        methods["grouped"] = lambda y: grouped_delta(y, x, A, B, scale, plan, grouped_mm)
        methods["gather"] = lambda y: grouped_delta(y, x, A, B, scale, unsorted_plan, grouped_mm)
    for name, fn in methods.items():
        try:
            got = torch.zeros(tokens, out_f, dtype=DTYPE, device=device)
            fn(got)
            err[name] = rel_err(got, ref)
            if err[name] > REL_TOL:
                why[name] = f"wrong: max err {err[name]:.3g} > {REL_TOL:g}"
                if name != "ours":
                    continue
            if name == "ours":  # our ops are always captured, whether or not they sync when eager
                replay, mode = graphed(lambda fn=fn: fn(y), device), "graph"
            else:
                replay, mode = try_graphed(lambda fn=fn: fn(y), device)
            s[name] = timer(replay)
            if mode != "graph" and device.type == "cuda":
                why[name] = "; ".join(filter(None, [why.get(name), f"timed {mode}"]))
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
            why[name] = short(e)
    s["base"] = timer(graphed(lambda: F.linear(x, W), device))
    s["lin"] = timer(graphed(lambda: ops.lora_linear(x, W, None, A, B, scale, index), device))
    return dict(s, err=err, why=why)


PREFILL_METHODS = {"ours": "ours", "grouped": "grouped GEMM", "loop": "mm loop"}


def prefill_row(tokens: int, n_ad: int, r: dict) -> list[str]:
    timed = {k: r[k] for k in PREFILL_METHODS if k in r}
    fastest = min(timed, key=timed.get) if timed else None
    if fastest is None:
        best = "n/a"
    elif fastest == "ours" or "ours" not in r:
        best = PREFILL_METHODS[fastest]
    else:
        best = f"{PREFILL_METHODS[fastest]} ({r[fastest] / r['ours']:.2f}x ours)"
    errs = ", ".join(f"{r['err'][k]:.1e}" if k in r["err"] else "n/a" for k in PREFILL_METHODS)
    cell = lambda k: us(r[k]) if k in r else "n/a"  # noqa: E731
    return [
        str(tokens),
        str(n_ad),
        str(tokens // n_ad),
        us(r["base"]),
        us(r["lin"]),
        f"{r['lin'] / r['base']:.3f}",
        cell("ours"),
        cell("grouped"),
        cell("gather"),
        cell("loop"),
        best,
        errs,
    ]


def run_prefill(timer, device, cfg: Config) -> tuple[str, dict]:
    in_f, out_f, rank = cfg.prefill
    g = torch.Generator(device=device).manual_seed(4)
    W = randn((out_f, in_f), in_f**-0.5, g, device)
    A = randn((cfg.slots, rank, in_f), in_f**-0.5, g, device)
    B = randn((cfg.slots, out_f, rank), rank**-0.5, g, device)
    scale = torch.rand(cfg.slots, generator=g, device=device) + 0.5
    results, rows_md, points, notes = {}, [], [], []
    for tokens in cfg.prefill_tokens:
        x = randn((tokens, in_f), 1.0, g, device)
        for n_ad in cfg.prefill_adapters:
            slot_ids = torch.randperm(cfg.slots, generator=torch.Generator().manual_seed(tokens + n_ad))[:n_ad]
            r = prefill_case(timer, device, W, A, B, scale, x, segmented_index(tokens, slot_ids.tolist()))
            results[(tokens, n_ad)] = r
            if "ours" in r:
                points.append((tokens // n_ad, r["ours"], {"grouped GEMM": r.get("grouped"), "mm loop": r.get("loop")}))
            notes += [f"- {tokens} tokens, {n_ad} adapters, {name}: {why}" for name, why in r["why"].items()]
            rows_md.append(prefill_row(tokens, n_ad, r))
            print(f"prefill: {markdown_table(PREFILL_HEADER, [rows_md[-1]]).splitlines()[-1]}", flush=True)
    how = "every column from a CUDA graph" if device.type == "cuda" else "every column eager (CPU)"
    parts = [
        f"Prefill: {in_f}->{out_f}, r = {rank}, contiguous segments, {how}; ours delta, grouped and mm loop "
        f"add the delta into a (tokens, {out_f}) y; max err: vs float64, relative to the delta's max "
        f"(accepted: <= {REL_TOL:g}), for ours, grouped, mm loop",
        markdown_table(PREFILL_HEADER, rows_md),
        f"Chosen by shape (ours delta vs the faster of grouped GEMM and the mm loop, contiguous segments): "
        f"{prefill_rule(points)}",
    ]
    if notes:
        parts.append("Not timed, or timed otherwise:\n" + "\n".join(notes))
    return "\n\n".join(parts), results


# ---- main ----


def main(argv: list[str] | None = None) -> str:
    default_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(default_dir, "bench_gpu.md"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--dry-run", action="store_true", help="= --device cpu --quick")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.quick = "cpu", True
    device = torch.device(args.device)
    cfg = QUICK if args.quick else FULL
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only add jitter on a shared machine
    if device.type == "cuda":
        assert torch.cuda.is_available() and ops.backend() == "compiled", "needs a GPU and the compiled extension"
    started = time.perf_counter()

    flush_bytes = flush_size(cfg, device)
    timer = Timer(device, flush_bytes, cfg.budget_s, cfg.max_reps)
    peak = peak_bandwidth(timer, cfg.copy_bytes)
    flush_s = timer(timer.flush, flush=False)
    bw_line = (
        f"Peak bandwidth (device-to-device copy of {cfg.copy_bytes / 2**20:.0f} MiB, bytes read + written): "
        f"{peak / 1e9:.0f} GB/s. L2 flush: a read-only reduction of {flush_bytes / 2**20:.0f} MiB, "
        f"{us(flush_s)} µs ({flush_bytes / flush_s / 1e9:.0f} GB/s read)"
    )
    print(bw_line, flush=True)

    failures = []  # a section that raises is reported in the table and the run goes on

    def section(name, fn, default):
        try:
            return fn()
        except Exception as e:  # a benchmark run should keep what it measured
            traceback.print_exc()
            failures.append(f"- {name} FAILED: {short(e)}")
            return default

    sweep: dict = {}
    section("decode sweep", lambda: run_sweep(timer, device, peak, cfg, sweep), sweep)
    launches_md, _ = section("decode launches", lambda: run_launches(timer, device, peak, cfg), ("", {}))
    prefill_md, prefill = section("prefill", lambda: run_prefill(timer, device, cfg), ("", {}))

    in_f, out_f, rank, rows, workload = cfg.decode
    d = sweep.get(cfg.decode)
    target = [f"Targets (issue 19), {'quick shapes, not the targets' if args.quick else 'bf16'}:"]
    if d is None:
        target.append(f"- decode: {cfg.decode} was not measured")
    else:
        label = f"{rows} rows x {d['distinct']} {workload} rank-{rank} adapters, {in_f}->{out_f}"
        target += decode_target_lines(label, d["graph"], d["floor"], d["eager"])
        target.append(f"- (issue 4's) PEFT-style loop / ours: {d['peft'] / d['graph']:.1f}x graph (target >= 5x)")
    p_in, p_out, p_rank = cfg.prefill
    label = f"{max(cfg.prefill_tokens)} tokens x 1 rank-{p_rank} adapter, {p_in}->{p_out}"
    p = prefill.get((max(cfg.prefill_tokens), 1))
    if p is None:
        target.append(f"- prefill, {label}: not measured")
    else:
        target.append(prefill_target_line(label, p["lin"], p["base"]))

    elapsed = time.perf_counter() - started
    text = (
        "\n\n".join(
            part
            for part in [
                "# lora_linear on the GPU (bench/bench_gpu.py)",
                f"Device: {card(device)}",
                bw_line,
                "Decode sweep (floor = (W + distinct adapters' A and B bytes) / peak; base % peak counts W only)",
                markdown_table(SWEEP_HEADER, [sweep_row(k, r, peak) for k, r in sweep.items()]),
                launches_md,
                prefill_md,
                "\n".join(target),
                "\n".join(["Sections that failed:", *failures]) if failures else "",
                f"Benchmark wall time: {elapsed:.0f} s.",
            ]
            if part
        )
        + "\n"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    if failures:
        raise SystemExit(1)
    return text


if __name__ == "__main__":
    main()
