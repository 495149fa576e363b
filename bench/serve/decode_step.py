"""The time of one pure decode step of the engine (nothing else running): the engine benchmarks'
decode capacity, rows / that time (bench_engine.py on the CPU, gpu_engine.py on a GPU)."""

from __future__ import annotations

import statistics
import time

import torch

from adapterhub.serve.engine import Engine
from adapterhub.serve.kv_cache import KVState


def decode_step_seconds(engine: Engine, residents: list[str | None], context: int, runs: int, warmup: int = 0) -> float:
    """The median time of `runs` steps of len(residents) decode tokens at `context` tokens each, the
    first `warmup` left out; one row per resident name (None: the base)."""
    rows = []
    for _ in residents:
        row = KVState("", [5] * context)
        assert engine.kv.grow(row, context)
        row.computed = context - 1
        rows.append(row)
    step = engine.kv.step([(row, 1) for row in rows], engine._pad)
    cuda = engine._device.type == "cuda"
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with engine._routed(list(residents), [1] * len(rows)), torch.inference_mode():
            engine._forward([5] * len(rows), step, list(range(len(rows))))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    for row in rows:
        engine.kv.free(row)
    return statistics.median(times[warmup:])
