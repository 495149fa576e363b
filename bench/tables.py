"""Ratio tables for the benchmarks: each bench module records medians here and
declares how its table is laid out; bench/conftest.py prints and saves them."""

from __future__ import annotations

import os
import platform
from collections import defaultdict
from collections.abc import Callable

import torch

# table -> case -> column -> median (ms)
MEDIANS: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
LAYOUTS: dict[str, Callable[[dict[str, dict[str, float]]], str]] = {}


def layout(table: str):
    """Declares the function that turns a table's medians into markdown."""

    def register(fn):
        LAYOUTS[table] = fn
        return fn

    return register


def record(table: str, case: str, column: str, benchmark) -> None:
    """Keeps the median of a finished pytest-benchmark run (ms)."""
    if benchmark.stats is not None:  # None under --benchmark-disable
        MEDIANS[table][case][column] = benchmark.stats.stats.median * 1e3


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def render_all() -> dict[str, str]:
    """table name -> markdown with the machine it ran on."""
    return {table: f"## {table}\n\nMachine: {machine()}\n\n{LAYOUTS[table](rows)}\n" for table, rows in MEDIANS.items()}
