"""lora_linear on the CPU, side by side with its peers (issue 2's op benchmark).

Columns, all in one run: the base matmul `x @ W.T` alone, the compiled `lora_linear`,
the pure-PyTorch fallback, and a PEFT-style loop (per unique adapter: gather its rows,
two matmuls, scatter-add; what PEFT does for mixed batches).
Floor: the memory floor, (W bytes + each distinct adapter's bytes once) / W bytes,
times the base time.
"""

from __future__ import annotations

import pytest
import torch

from adapterhub import ops
from adapterhub.ops import reference
from bench.tables import layout, record

RANK = 16
SHAPES = [(576, 1536), (4096, 4096)]
# name -> (rows, distinct slots)
WORKLOADS = {"prefill 512x1": (512, 1), "decode 32x32": (32, 32), "decode 32x4": (32, 4)}
COLUMNS = ["base", "compiled", "fallback", "peft_loop"]


def make_case(d_in: int, d_out: int, rows: int, slots: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=g)
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    A = torch.randn(slots, RANK, d_in, generator=g) / d_in**0.5
    B = torch.randn(slots, d_out, RANK, generator=g) / RANK**0.5
    scale = torch.full((slots,), 2.0)
    index = torch.arange(rows) % slots
    index = index[torch.randperm(rows, generator=g)]
    return x, W, A, B, scale, index


def peft_style_loop(x, W, A_list, B_list, scales, names):
    """PEFT's mixed-batch forward: one gather, two matmuls and one scatter-add per unique adapter."""
    y = torch.nn.functional.linear(x, W)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        y[rows] += (x[rows] @ A_list[name].T @ B_list[name].T) * scales[name]
    return y


def implementations(x, W, A, B, scale, index):
    names = index.tolist()
    A_list, B_list = list(A.unbind(0)), list(B.unbind(0))
    scales = scale.tolist()
    return {
        "base": lambda: torch.nn.functional.linear(x, W),
        "compiled": lambda: ops.lora_linear(x, W, None, A, B, scale, index),
        "fallback": lambda: reference.lora_linear(x, W, None, A, B, scale, index),
        "peft_loop": lambda: peft_style_loop(x, W, A_list, B_list, scales, names),
    }


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}->{s[1]}")
def bench_lora_linear(benchmark, shape, workload, column):
    if column == "compiled" and ops.backend() != "compiled":
        pytest.skip("adapterhub._C is not built")
    rows, slots = WORKLOADS[workload]
    case = make_case(*shape, rows, slots)
    fn = implementations(*case)[column]
    if column != "base":
        torch.testing.assert_close(fn(), reference.lora_linear(*case[:2], None, *case[2:]), rtol=1e-4, atol=1e-4)
    benchmark.group = f"{shape[0]}->{shape[1]} {workload}"
    benchmark.pedantic(fn, rounds=30, warmup_rounds=3, iterations=1)
    record("ops_cpu", f"{shape[0]}->{shape[1]} {workload}", column, benchmark)


def memory_floor(case: str) -> float:
    """(W bytes + distinct adapters' bytes) / W bytes for a case name like '576->1536 decode 32x32'."""
    dims, workload = case.split(" ", 1)
    d_in, d_out = map(int, dims.split("->"))
    slots = WORKLOADS[workload][1]
    return (d_in * d_out + slots * RANK * (d_in + d_out)) / (d_in * d_out)


@layout("ops_cpu")
def ops_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "| case (rank 16, fp32) | base ms | compiled ms | fallback ms | PEFT loop ms "
        "| compiled / base | memory floor / base | compiled / floor | PEFT loop / compiled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, m in rows.items():
        if not {"base", "compiled", "peft_loop"} <= m.keys():
            continue
        floor = memory_floor(case)
        lines.append(
            f"| {case} | {m['base']:.3f} | {m['compiled']:.3f} | {m.get('fallback', float('nan')):.3f} "
            f"| {m['peft_loop']:.3f} | {m['compiled'] / m['base']:.2f}x | {floor:.2f}x "
            f"| {m['compiled'] / (m['base'] * floor):.2f} | {m['peft_loop'] / m['compiled']:.1f}x |"
        )
    return "\n".join(lines)


PADDED_RANK = 64


@pytest.mark.parametrize("column", ["padded", "ranks"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}->{s[1]}")
def bench_rank_padding(benchmark, shape, column):
    """Rank-16 adapters in max_rank-64 slots: zero padding read (ranks=None) vs skipped (per-slot ranks)."""
    if ops.backend() != "compiled":
        pytest.skip("adapterhub._C is not built")
    x, W, A16, B16, scale, index = make_case(*shape, 32, 32)
    A = torch.nn.functional.pad(A16, (0, 0, 0, PADDED_RANK - RANK)).contiguous()  # (slots, 64, in)
    B = torch.nn.functional.pad(B16, (0, PADDED_RANK - RANK)).contiguous()  # (slots, out, 64)
    ranks = torch.full((A.size(0),), RANK) if column == "ranks" else None
    fn = lambda: ops.lora_linear(x, W, None, A, B, scale, index, ranks)  # noqa: E731
    torch.testing.assert_close(fn(), ops.lora_linear(x, W, None, A16, B16, scale, index), rtol=1e-4, atol=1e-4)
    benchmark.pedantic(fn, rounds=30, warmup_rounds=3, iterations=1)
    record("ops_cpu_rank_padding", f"{shape[0]}->{shape[1]} decode 32x32", column, benchmark)


@layout("ops_cpu_rank_padding")
def padding_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "| case (rank 16 in max_rank 64 slots) | zero-padded ms | per-slot ranks ms | padded / ranks |",
        "|---|---|---|---|",
    ]
    for case, m in rows.items():
        if {"padded", "ranks"} <= m.keys():
            lines.append(f"| {case} | {m['padded']:.3f} | {m['ranks']:.3f} | {m['padded'] / m['ranks']:.2f}x |")
    return "\n".join(lines)
