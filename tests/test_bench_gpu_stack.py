"""bench/gpu_stack.py end to end on the CPU (--quick: a tiny Llama), as it runs on a GPU: it writes its
markdown and JSON, every check passes, and the numbers it reports hold on their own (ours equals PEFT
in fp32, stays within the bf16 tolerance, the adapters change the logits, every row was timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_stack")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_stack", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out


def test_writes_the_report_and_passes(run):
    proc, out = run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = (out / "gpu_stack_cpu.md").read_text()
    assert text in proc.stdout  # printed too
    for heading in ("### 1. Logits vs PEFT", "### 2. Gradients", "### 3. Times"):
        assert heading in text
    assert "All checks: ok." in text and "NOT OK" not in text


def test_numbers_within_tolerance(run):
    _, out = run
    report = json.loads((out / "gpu_stack_cpu.json").read_text())
    assert report["ok"] and not report["errors"]
    tol = report["tolerances"]
    logits = report["logits"]
    assert len(logits) == 5  # each of the 4 adapters alone, and the mixed batch
    for r in logits:
        assert r["ours_vs_peft_fp32"] <= tol["fp32_logits"], r
        assert r["ours_bf16_vs_fp32"] <= max(2 * r["peft_bf16_vs_fp32"], tol["bf16_logits_floor"]), r
        assert r["effect"] > 0.05, r  # the adapters matter, so equal logits mean something
        assert r["effect"] >= 10 * r["ours_vs_peft_bf16"], r
    grads = report["grads"]
    assert grads["tensors"] == 2 * 7 * 2 and not grads["zero_gradients"]  # A and B, 7 projections, 2 layers
    assert grads["ours_vs_peft_fp32"] <= tol["fp32_grads"]
    assert grads["ours_bf16_vs_fp32"] <= max(2 * grads["peft_bf16_vs_fp32"], tol["bf16_grads_floor"])
    times = report["times"]  # prefill with one adapter, prefill mixed, decode mixed, a training step
    assert [r["case"].split()[0] for r in times] == ["prefill", "prefill", "decode", "train"], times
    for r in times:
        assert all(r[c] > 0 for c in ("base", "ours", "peft") if c in r) and r["ours"] and r["peft"], r
