"""The CPU side of bench/bench_gpu.py: workloads, the floor arithmetic, the grouped-GEMM and
per-segment deltas against the ops' reference, the rule and table rendering, and the whole
script end to end on tiny shapes on the CPU (--dry-run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterhub.ops import reference

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_gpu as bg  # noqa: E402

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def test_floor_of_the_decode_target_by_hand():
    # 4096x4096 bf16 W: 4096 * 4096 * 2 = 33,554,432 bytes; 64 rank-16 adapters, each
    # 16 * (4096 + 4096) * 2 = 262,144 bytes, 16,777,216 in all; at 4e12 B/s: 50,331,648 / 4e12 s.
    assert bg.weight_bytes(4096, 4096) == 33_554_432
    assert bg.adapter_bytes(64, 16, 4096, 4096) == 16_777_216
    floor = bg.floor_seconds(4096, 4096, 16, 64, peak=4e12)
    assert floor == pytest.approx(12.582912e-6, rel=1e-12)
    # unequal in/out: A is (r, in), B is (out, r); one rank-64 adapter on 4096 -> 11008
    assert bg.adapter_bytes(1, 64, 4096, 11008) == 64 * (4096 + 11008) * 2
    assert bg.floor_seconds(4096, 11008, 64, 1, peak=1e12) == pytest.approx(
        (4096 * 11008 * 2 + 64 * 15104 * 2) / 1e12, rel=1e-12
    )
    # twice the floor's time is 50% of peak over the same bytes
    assert bg.pct_of_peak(50_331_648, 2 * floor, 4e12) == pytest.approx(50.0)


def test_distinct_adapters_counts_each_slot_once_and_skips_minus_one():
    assert bg.distinct_adapters(torch.tensor([3, 3, -1, 5, 3, 7])) == 3
    assert bg.distinct_adapters(torch.tensor([-1, -1])) == 0
    assert bg.distinct_adapters(torch.tensor([[1, 2], [2, -1]])) == 2


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_workloads(rows):
    def draw(workload, seed=0):
        return bg.routing(workload, rows, torch.Generator().manual_seed(seed), slots=256, pool=64)

    assert bg.distinct_adapters(draw("distinct")) == rows
    assert bg.distinct_adapters(draw("identical")) == 1
    for workload in ("uniform", "skewed"):
        index = draw(workload)
        assert index.dtype == torch.int64 and index.shape == (rows,)
        assert int(index.min()) >= 0 and int(index.max()) < 64
        assert torch.equal(index, draw(workload)), "same seed, same routing"
    if rows == 64:
        # Zipf(1.5) over 64 concentrates on few adapters, uniform spreads: 64 draws, well apart
        assert bg.distinct_adapters(draw("skewed")) < bg.distinct_adapters(draw("uniform")) - 10
    with pytest.raises(ValueError):
        bg.routing("distinct", 300, torch.Generator(), slots=256)


def test_segmented_index():
    index = bg.segmented_index(10, [7, 2, 5])
    assert index.tolist() == [7, 7, 7, 7, 2, 2, 2, 5, 5, 5]


def test_grouping_keeps_contiguous_runs_in_order():
    plan = bg.grouping(torch.tensor([7, 7, 2, 2, 2, 5]))
    assert plan.presorted
    assert plan.perm.tolist() == [0, 1, 2, 3, 4, 5]
    assert plan.slots.tolist() == [7, 2, 5]
    assert plan.offs.dtype == torch.int32 and plan.offs.tolist() == [2, 5, 6]
    assert plan.segments == ((0, 2, 7), (2, 5, 2), (5, 6, 5))
    assert plan.row_slot.tolist() == [7, 7, 2, 2, 2, 5]


def test_grouping_sorts_interleaved_rows_and_drops_minus_one():
    plan = bg.grouping(torch.tensor([4, 1, -1, 4, 1, 1, 9]))
    assert not plan.presorted
    assert plan.perm.tolist() == [1, 4, 5, 0, 3, 6]  # stable: by slot, then by row
    assert plan.row_slot.tolist() == [1, 1, 1, 4, 4, 9]
    assert plan.slots.tolist() == [1, 4, 9]
    assert plan.offs.tolist() == [3, 5, 6]
    assert plan.segments == ((0, 3, 1), (3, 5, 4), (5, 6, 9))
    # one adapter in two runs is not grouped either
    assert not bg.grouping(torch.tensor([3, 3, 8, 3])).presorted
    assert not bg.grouping(torch.tensor([3, -1])).presorted


def _inputs(dtype, rows=48, in_f=64, out_f=32, rank=8, slots=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    A = (torch.randn(slots, rank, in_f, generator=g) * in_f**-0.5).to(dtype)
    B = (torch.randn(slots, out_f, rank, generator=g) * rank**-0.5).to(dtype)
    scale = torch.rand(slots, generator=g) + 0.5
    return x, A, B, scale


INDEXES = {
    "contiguous": torch.tensor([5] * 16 + [0] * 8 + [3] * 24),
    "one adapter": torch.tensor([2] * 48),
    "interleaved, with -1": torch.tensor([1, 4, -1, 4, 1, 0] * 8),
}


def _ref_delta(x, A, B, scale, index):
    """adapterhub.ops.reference.lora_linear with W = 0: its delta alone."""
    W = torch.zeros(B.size(1), x.size(1), dtype=x.dtype)
    return reference.lora_linear(x, W, None, A, B, scale, index)


@pytest.mark.parametrize("name", list(INDEXES))
def test_segment_loop_matches_the_reference_in_float32(name):
    index = INDEXES[name]
    x, A, B, scale = _inputs(torch.float32)
    y0 = torch.randn(x.size(0), B.size(1))
    y = y0.clone()
    bg.segment_loop_delta(y, x, A, B, scale.tolist(), bg.grouping(index))
    torch.testing.assert_close(y - y0, _ref_delta(x, A, B, scale, index), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[index < 0], y0[index < 0]), "rows without an adapter are left alone"


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch has no _grouped_mm")
@pytest.mark.parametrize("name", list(INDEXES))
def test_grouped_delta_matches_the_reference_in_float32(name):
    index = INDEXES[name]
    x, A, B, scale = _inputs(torch.float32)
    plan = bg.grouping(index)
    y0 = torch.randn(x.size(0), B.size(1))
    y = y0.clone()
    bg.grouped_delta(y, x, A, B, scale, plan)
    expected = _ref_delta(x, A, B, scale, index)
    torch.testing.assert_close(y - y0, expected, rtol=1e-5, atol=1e-5)
    if plan.presorted:  # the gather/scatter variant the benchmark also times gives the same
        y = y0.clone()
        bg.grouped_delta(y, x, A, B, scale, bg.dataclasses.replace(plan, presorted=False))
        torch.testing.assert_close(y - y0, expected, rtol=1e-5, atol=1e-5)


def test_grouped_delta_uses_the_offsets_it_is_given():
    # a grouped_mm stand-in that records its calls: the 2d x 3d layout and int32 offsets
    # (slot 0: 8 rows, slot 1: 16, slot 4: 16; the -1 rows left out)
    index = INDEXES["interleaved, with -1"]
    x, A, B, scale = _inputs(torch.float32)
    plan = bg.grouping(index)
    calls = []

    def grouped_mm(a, b, offs):
        calls.append((tuple(a.shape), tuple(b.shape), offs.tolist()))
        out, start = [], 0
        for g, end in enumerate(offs.tolist()):
            out.append(a[start:end] @ b[g])
            start = end
        return torch.cat(out)

    y = torch.zeros(x.size(0), B.size(1))
    bg.grouped_delta(y, x, A, B, scale, plan, grouped_mm=grouped_mm)
    n = int((index >= 0).sum())
    assert calls == [((n, 64), (3, 64, 8), [8, 24, 40]), ((n, 8), (3, 8, 32), [8, 24, 40])]
    torch.testing.assert_close(y, _ref_delta(x, A, B, scale, index), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(INDEXES))
def test_bf16_deltas_pass_the_benchmarks_check_and_a_wrong_one_fails(name):
    index = INDEXES[name]
    x, A, B, scale = _inputs(torch.bfloat16, in_f=64, out_f=64, rank=16)
    ref = bg.reference_delta64(x, A, B, scale, index)
    assert ref.dtype == torch.float64
    torch.testing.assert_close(ref.float(), _ref_delta(x, A, B, scale, index).float(), rtol=2e-2, atol=3e-2)
    methods = {"loop": lambda y, plan: bg.segment_loop_delta(y, x, A, B, scale.tolist(), plan)}
    if HAS_GROUPED_MM:
        methods["grouped"] = lambda y, plan: bg.grouped_delta(y, x, A, B, scale, plan)
    for method, fn in methods.items():
        y = torch.zeros(x.size(0), B.size(1), dtype=torch.bfloat16)
        fn(y, bg.grouping(index))
        assert bg.rel_err(y, ref) <= bg.REL_TOL, method
        # routed to the wrong adapters (each slot shifted by one), the check must say so
        wrong = torch.where(index >= 0, (index + 1) % A.size(0), index)
        y = torch.zeros(x.size(0), B.size(1), dtype=torch.bfloat16)
        fn(y, bg.grouping(wrong))
        assert bg.rel_err(y, ref) > 10 * bg.REL_TOL, method


def test_prefill_rule():
    def pts(*rows):
        return [(tpa, ours, {"grouped GEMM": grouped, "mm loop": loop}) for tpa, ours, grouped, loop in rows]

    # grouped GEMM wins from 256 tokens per adapter up, ours below
    rule = bg.prefill_rule(pts((32, 1.0, 2.0, 3.0), (128, 1.0, 1.5, 1.2), (256, 1.0, 0.9, 1.1), (4096, 1.0, 0.5, 0.6)))
    assert rule == "grouped GEMM when tokens/adapter >= 256, SGMV (ours) at or below 128."
    assert "SGMV (ours) is fastest at every measured shape" in bg.prefill_rule(pts((32, 1.0, 2.0, 3.0)))
    # no alternative ran: ours stays
    assert "SGMV (ours) is fastest" in bg.prefill_rule(pts((32, 1.0, None, None)))
    mixed = bg.prefill_rule(pts((32, 1.0, 0.5, 3.0), (4096, 1.0, 0.9, 0.4)))
    assert mixed.startswith("cuBLAS (grouped GEMM or mm loop, whichever is faster) at every measured shape")
    # wins below and above a loss: no threshold to state
    assert bg.prefill_rule(pts((32, 1.0, 0.5, 3.0), (128, 1.0, 1.5, 3.0), (512, 1.0, 0.5, 3.0))).startswith(
        "no clean threshold"
    )
    # two shapes with the same tokens per adapter, one won by an alternative and one by ours
    tie = bg.prefill_rule(pts((32, 1.0, 0.5, 3.0), (32, 1.0, 1.5, 3.0), (128, 1.0, 0.5, 3.0)))
    assert tie.startswith("no clean threshold") and "32: SGMV" in tie and "32: grouped GEMM" in tie


def test_markdown_table_and_cells():
    text = bg.markdown_table(["a", "b"], [["1", "x|y"], ["2", "3"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x/y |", "| 2 | 3 |"]
    with pytest.raises(ValueError):
        bg.markdown_table(["a", "b"], [["1"]])
    assert (bg.us(12.34e-6), bg.us(1234.5e-6), bg.us(None)) == ("12.3", "1234", "n/a")
    r = dict(
        distinct=64, base=20e-6, eager=40e-6, host=30e-6, graph=25e-6, fallback=1e-3, peft=5e-3, floor=12.5e-6, ok=True
    )
    row = bg.sweep_row((4096, 4096, 16, 64, "distinct"), r, peak=4e12)
    assert len(row) == len(bg.SWEEP_HEADER)
    cells = dict(zip(bg.SWEEP_HEADER, row))
    assert cells["graph / floor"] == "2.00" and cells["% peak (graph)"] == "50%"
    assert cells["base % peak"] == f"{100 * 33_554_432 / 20e-6 / 4e12:.0f}%" == "42%"
    assert cells["PEFT / ours graph"] == "200.0x"


def test_target_verdicts():
    met = bg.decode_target_lines("t", graph_s=11e-6, floor_s=10e-6, eager_s=30e-6)
    assert "1.10x the floor" in met[0] and met[0].endswith("met") and "NOT" not in met[0]
    assert "91% of peak" in met[1] and "NOT met" not in met[1]
    missed = bg.decode_target_lines("t", graph_s=13e-6, floor_s=10e-6, eager_s=30e-6)
    assert missed[0].endswith("NOT met") and "77% of peak" in missed[1] and "NOT met" not in missed[1]
    assert "NOT met" in bg.decode_target_lines("t", graph_s=15e-6, floor_s=10e-6, eager_s=30e-6)[1]
    assert bg.prefill_target_line("p", ours_s=104e-6, base_s=100e-6).endswith(", met")
    assert bg.prefill_target_line("p", ours_s=106e-6, base_s=100e-6).endswith("NOT met")


def test_dry_run_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "bench_gpu.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_gpu", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for needle in ("Device: CPU", "Peak bandwidth", "L2 flush: a read-only reduction", "Decode launches", "Targets"):
        assert needle in text, needle
    tables = {}  # first header cell -> [header, rows...]
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if len(lines) >= 2 and lines[1].startswith("|---"):
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line[:4] != "|---"]
            tables[rows[0][0]] = rows
    sweep_rows = sum(len(rows) * len(wl) for ranks, rows, wl in bg.QUICK.sweep.values())
    assert len(tables["in->out"]) == 1 + sweep_rows
    assert all(row[-1] == "yes" for row in tables["in->out"][1:]), "ours matches the fallback"
    assert len(tables["call"]) == 1 + 6
    prefill = tables["tokens"]
    assert len(prefill) == 1 + len(bg.QUICK.prefill_tokens) * len(bg.QUICK.prefill_adapters)
    head = prefill[0]
    for row in prefill[1:]:
        cells = dict(zip(head, row))
        assert cells["ours delta µs"] != "n/a" and cells["mm loop µs"] != "n/a"
        if HAS_GROUPED_MM:
            assert cells["grouped µs"] != "n/a", text
        errs = cells["max err (ours, grouped, loop)"].split(", ")
        assert all(e == "n/a" or float(e) <= bg.REL_TOL for e in errs)
    assert "Chosen by shape" in text and "decode," in text and "prefill," in text
