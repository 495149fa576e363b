"""The CUDA kernels of the gathered low-rank ops (csrc/cuda) against the float64 reference.

Every result is compared with adapterhub.ops.reference run on the CPU in float64 on the same
(dtype-rounded) inputs. Slot padding beyond a slot's rank holds NaN, so any read of it shows.
Skipped without an NVIDIA GPU or without the CUDA build of adapterhub._C.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import zlib

import pytest
import torch

import adapterhub
from adapterhub import ops
from adapterhub.ops import reference


def _cuda_build() -> bool:
    if adapterhub.backend() != "compiled" or not torch.cuda.is_available():
        return False
    from adapterhub import _C

    return bool(_C.with_cuda)


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _cuda_build(), reason="needs an NVIDIA GPU and adapterhub._C built with CUDA"),
]

DEV = "cuda"


def _has_clusters() -> bool:
    return _cuda_build() and torch.cuda.get_device_capability()[0] >= 9


needs_clusters = pytest.mark.skipif(not _has_clusters(), reason="the fused decode kernel needs sm_90+")
# "split" (shrink, expand) or "fused" (one launch, sm_90+): the decode kernels a test runs with
DECODE_MODES = ["split", pytest.param("fused", marks=needs_clusters)]


@contextlib.contextmanager
def decode_mode(mode: str):
    """Inside the block, decode batches of lora_delta / lora_linear run with `mode`'s kernels."""
    from adapterhub import _C

    previous = _C.set_cuda_decode(mode)
    try:
        yield
    finally:
        _C.set_cuda_decode(previous)


def captured(fn):
    """(graph, its output): fn warmed up on a side stream, then captured once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# dtype -> (rtol, atol) against float64 for O(1) values; t is float32 whatever the input dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 3e-2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def route(pattern: str, rows: int, slots: int, g: torch.Generator) -> torch.Tensor:
    """index (rows,) int64: shuffled slots and -1, all -1, or one slot (the last) for every row."""
    if pattern == "shuffled":
        return torch.randint(-1, slots, (rows,), generator=g)
    if pattern == "all_none":
        return torch.full((rows,), -1)
    if pattern == "one_slot":
        return torch.full((rows,), slots - 1)
    raise ValueError(pattern)


def make_inputs(
    rows, slots, rank, in_f, out_f, dtype, pattern="shuffled", padded=True, seed=0, tokens=None, max_rank=None
):
    """CPU tensors with O(1) outputs. padded: max_rank > rank (default rank + 3, or + 8 from rank 8 on,
    keeping 16-byte rows) and per-slot ranks (rank; rank // 2 for slot 1, 0 for slot 2), NaN padding."""
    g = torch.Generator().manual_seed(seed)
    if max_rank is None:
        max_rank = (rank + (8 if rank >= 8 else 3)) if padded else rank

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    ranks = None
    A = randn(slots, max_rank, in_f, std=in_f**-0.5)
    B = randn(slots, out_f, max_rank, std=rank**-0.5)
    if padded:
        ranks = torch.full((slots,), rank)
        if slots > 1:
            ranks[1] = max(1, rank // 2)
        if slots > 2:
            ranks[2] = 0
        for s, r in enumerate(ranks.tolist()):
            A[s, r:] = float("nan")
            B[s, :, r:] = float("nan")
    index = route(pattern, rows, slots, g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.randn(rows, max_rank, generator=g, dtype=torch.float64)
    for i, s in enumerate(index.tolist()):  # NaN wherever lora_expand must not read
        t[i, (max_rank if ranks is None else int(ranks[s])) if s >= 0 else 0 :] = float("nan")
    lead = (rows,) if tokens is None else (rows, tokens)
    return dict(
        x=randn(*lead, in_f),
        W=randn(out_f, in_f, std=in_f**-0.5),
        bias=randn(out_f),
        A=A,
        B=B,
        scale=torch.rand(slots, generator=g) * 1.5 + 0.25,
        index=index,
        ranks=ranks,
        y=randn(rows, out_f),
        t=t.to(acc),
    )


def cuda(v):
    return None if v is None else v.to(DEV)


def f64(v):
    return None if v is None or not v.is_floating_point() else v.double()


def assert_close(got, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.cpu().double(), expected.double(), rtol=rtol, atol=atol)


def check_all_ops(c, dtype):
    """lora_shrink, lora_expand and lora_linear on CUDA vs the float64 reference on the CPU."""
    x, A, B, index, ranks, scale = c["x"], c["A"], c["B"], c["index"], c["ranks"], c["scale"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = ops.lora_shrink(cuda(x), cuda(A), cuda(index), cuda(ranks))
    assert t.dtype == acc and t.shape == (x.size(0), A.size(1))
    assert_close(t, reference.lora_shrink(f64(x), f64(A), index, ranks), acc)

    y = cuda(c["y"].clone())
    ops.lora_expand(y, cuda(c["t"]), cuda(B), cuda(scale), cuda(index), cuda(ranks))
    expected = c["y"].double()
    reference.lora_expand(expected, c["t"].double(), f64(B), scale, index, ranks)
    untouched = index == -1 if ranks is None else (index == -1) | (ranks[index.clamp(min=0)] == 0)
    assert torch.equal(y.cpu()[untouched], c["y"][untouched])
    assert_close(y, expected, dtype)

    check_delta(c, dtype)
    args = (x, c["W"], c["bias"], A, B, scale, index, ranks)
    got = ops.lora_linear(*map(cuda, args))
    assert got.dtype == dtype
    assert_close(got, reference.lora_linear(*map(f64, args[:5]), scale, index, ranks), dtype)


def check_delta(c, dtype, weight=None):
    """lora_delta (shrink and expand in one op: what the adapted layers call) on CUDA vs float64."""
    x, A, B, index, ranks, scale = c["x"], c["A"], c["B"], c["index"], c["ranks"], c["scale"]
    y = cuda(c["y"].clone())
    ops.lora_delta(y, cuda(x), cuda(A), cuda(B), cuda(scale), cuda(index), cuda(ranks), cuda(weight))
    expected = c["y"].double()
    reference.lora_delta(expected, f64(x), f64(A), f64(B), scale, index, ranks, weight)
    untouched = index == -1 if ranks is None else (index == -1) | (ranks[index.clamp(min=0)] == 0)
    assert torch.equal(y.cpu()[untouched], c["y"][untouched])
    assert_close(y, expected, dtype)


# rank -> (in, out): odd sizes (scalar loads) for rank 1, vector-friendly ones for the rest.
FEATURES = {1: (37, 29), 8: (136, 72), 16: (264, 40), 64: (128, 200)}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("pattern", ["shuffled", "all_none", "one_slot"])
@pytest.mark.parametrize("rows", [0, 1, 33, 512])
@pytest.mark.parametrize("slots", [1, 64])
@pytest.mark.parametrize("rank", [1, 8, 16, 64])
def test_ops_match_reference(rank, slots, rows, pattern, dtype):
    in_f, out_f = FEATURES[rank]
    c = make_inputs(rows, slots, rank, in_f, out_f, dtype, pattern, seed=seed_of(rank, slots, rows, pattern, dtype))
    check_all_ops(c, dtype)


@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float64], ids=[*DTYPES.keys(), "fp64"])
@pytest.mark.parametrize("rank, max_rank", [(16, 16), (64, 64), (256, 256), (256, 260), (5, 13)])
def test_dense_and_max_rank(rank, max_rank, dtype):
    """ranks=None (every slot at max_rank), the largest ranks, and max_rank not a multiple of 8."""
    padded = max_rank > rank
    c = make_inputs(100, 6, rank, 96, 48, dtype, padded=padded, seed=seed_of(rank, max_rank, dtype), max_rank=max_rank)
    check_all_ops(c, dtype)


@pytest.mark.parametrize("in_f, out_f", [(4096, 11008), (11008, 4096), (1, 3), (4099, 5)])
@pytest.mark.parametrize("pattern", ["shuffled", "one_slot"])
def test_large_and_odd_features(in_f, out_f, pattern):
    c = make_inputs(33, 8, 16, in_f, out_f, torch.bfloat16, pattern, seed=seed_of(in_f, out_f, pattern))
    check_all_ops(c, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_unaligned_pointers(dtype):
    """Tensors that start off a 16-byte boundary take the scalar-load path."""
    c = make_inputs(40, 4, 8, 64, 32, dtype, seed=seed_of("unaligned", dtype))

    def shifted(v):
        buf = torch.empty(v.numel() + 1, dtype=v.dtype, device=DEV)
        out = buf[1:].view(v.shape)
        out.copy_(v)
        return out

    x, A, B = shifted(c["x"]), shifted(c["A"]), shifted(c["B"])
    assert x.data_ptr() % 16 and A.data_ptr() % 16 and B.data_ptr() % 16
    t = ops.lora_shrink(x, A, cuda(c["index"]), cuda(c["ranks"]))
    assert_close(t, reference.lora_shrink(f64(c["x"]), f64(c["A"]), c["index"], c["ranks"]), torch.float32)
    y = shifted(c["y"])
    ops.lora_expand(y, cuda(c["t"]), B, cuda(c["scale"]), cuda(c["index"]), cuda(c["ranks"]))
    expected = c["y"].double()
    reference.lora_expand(expected, c["t"].double(), f64(c["B"]), c["scale"], c["index"], c["ranks"])
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_leading_dims(dtype):
    """x (n0, T, in) with index (n0,): entry i routes all of x[i]."""
    c = make_inputs(6, 3, 4, 19, 23, dtype, seed=seed_of("3d", dtype), tokens=5)
    args = (c["x"], c["W"], c["bias"], c["A"], c["B"], c["scale"], c["index"], c["ranks"])
    got = ops.lora_linear(*map(cuda, args))
    assert got.shape == (6, 5, 23)
    assert_close(got, reference.lora_linear(*map(f64, args[:5]), *args[5:]), dtype)


# Runs in a child process: a crash while raising must fail this test, not end the session.
# CPU ops raise at the call. CUDA ops check on the device without a host sync: the call runs the bad
# row as "no adapter", and the error comes from the next op on the device or check_routing_errors().
BAD_ROUTING = """
import sys, torch
from adapterhub import ops
bad, device = sys.argv[1], sys.argv[2]
x, A, B = torch.randn(10, 16), torch.randn(4, 8, 16), torch.randn(4, 12, 8)
t, y, scale = torch.randn(10, 8), torch.randn(10, 12), torch.ones(4)
index, ranks = torch.arange(10) % 4, torch.full((4,), 8)
good_index, good_ranks = index.clone(), ranks.clone()
if bad == "index_high":
    index[3] = 4
elif bad == "index_low":
    index[3] = -2
elif bad == "ranks_high":
    ranks[1] = 9
else:
    ranks[1] = -1
x, A, B, t, y, scale, index, ranks, good_index, good_ranks = (
    v.to(device) for v in (x, A, B, t, y, scale, index, ranks, good_index, good_ranks)
)
y0 = y.clone()

def attempt(call):
    try:
        call()
        print("no error")
    except ValueError as error:
        print(str(error).splitlines()[0])

for call in (lambda: ops.lora_shrink(x, A, index, ranks), lambda: ops.lora_expand(y, t, B, scale, index, ranks)):
    attempt(call)
    attempt(ops.check_routing_errors)
if device == "cuda":  # a pending error is raised by the next op, before it touches anything
    ops.lora_expand(y, t, B, scale, index, ranks)
    torch.cuda.synchronize()
    y1 = y.clone()
    attempt(lambda: ops.lora_expand(y, t, B, scale, good_index, good_ranks))
    print("y untouched:", torch.equal(y, y1))
    attempt(lambda: ops.lora_expand(y, t, B, scale, good_index, good_ranks))  # nothing pending any more
else:
    print("y untouched:", torch.equal(y, y0))
"""


@pytest.mark.parametrize("device", ["cuda", "cpu"])  # cpu: the same build's CPU kernels, for comparison
@pytest.mark.parametrize("bad", ["index_high", "index_low", "ranks_high", "ranks_low"])
def test_bad_routing_values_raise(bad, device):
    run = subprocess.run(
        [sys.executable, "-c", BAD_ROUTING, bad, device],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert run.returncode == 0, f"crashed (rc {run.returncode}): {run.stderr[-2000:]}"
    what = "index" if bad.startswith("index") else "ranks"
    lines = run.stdout.splitlines()
    if device == "cpu":
        assert lines[0].startswith(f"lora_shrink: {what} values must be in"), run.stdout
        assert lines[1] == "no error", run.stdout
        assert lines[2].startswith(f"lora_expand: {what} values must be in"), run.stdout
        assert lines[3:] == ["no error", "y untouched: True"], run.stdout
        return
    assert lines[0] == "no error", run.stdout
    assert lines[1].startswith(f"lora_shrink: {what} values must be in"), run.stdout
    assert lines[2] == "no error", run.stdout
    assert lines[3].startswith(f"lora_expand: {what} values must be in"), run.stdout
    assert lines[4].startswith(f"lora_expand: {what} values must be in"), run.stdout
    assert lines[5:] == ["y untouched: True", "no error"], run.stdout


@pytest.mark.parametrize("rows", [8, 512])  # BGMV and SGMV
def test_bad_rows_run_as_no_adapter(rows):
    """Out-of-range slots read as -1 in eager calls too (the error is reported, nothing is read out of bounds)."""
    c = make_inputs(rows, 6, 8, 64, 48, torch.float32, seed=seed_of("bad rows", rows))
    index = c["index"].clone()
    index[::3] = 99
    y = cuda(c["y"].clone())
    ops.lora_delta(y, *map(cuda, (c["x"], c["A"], c["B"], c["scale"], index, c["ranks"])))
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"lora_delta: index values must be in \[-1, 6\) \(slots = 6\), got 99 at row"):
        ops.check_routing_errors()
    args = (c["x"], c["W"], c["bias"], c["A"], c["B"], c["scale"])
    got = ops.lora_linear(*map(cuda, args), cuda(index), cuda(c["ranks"]))  # raises only what was pending before
    torch.cuda.synchronize()
    with pytest.raises(
        ValueError, match=r"lora_linear: index values must be in \[-1, 6\) \(slots = 6\), got 99 at row"
    ):
        ops.check_routing_errors()
    effective = torch.where(index == 99, -1, index)
    assert_close(got, reference.lora_linear(*map(f64, args), effective, c["ranks"]), torch.float32)
    ops.check_routing_errors()  # raised once, then cleared


@pytest.mark.parametrize("decode", DECODE_MODES)
@pytest.mark.parametrize("rows", [8, 512])  # BGMV and SGMV
def test_eager_ops_do_not_sync(rows, decode):
    """An eager lora_linear forward issues no host synchronization (torch's sync debug mode errors on one)."""
    c = {k: cuda(v) for k, v in make_inputs(rows, 6, 8, 64, 48, torch.bfloat16, seed=seed_of("sync", rows)).items()}
    args = (c["x"], c["W"], c["bias"], c["A"], c["B"], c["scale"], c["index"], c["ranks"])
    with decode_mode(decode):
        ops.lora_linear(*args)  # the first call on a device sets up its error sink
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                y = ops.lora_linear(*args)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    assert_close(
        y,
        reference.lora_linear(
            *map(f64, (c["x"].cpu(), *(v.cpu() for v in args[1:5]))),
            c["scale"].cpu(),
            c["index"].cpu(),
            c["ranks"].cpu(),
        ),
        torch.bfloat16,
    )


def test_gradcheck_float64():
    c = make_inputs(12, 3, 3, 5, 4, torch.float64, seed=11)
    for v in (c["A"], c["B"]):
        v.nan_to_num_(0.5)  # finite padding: gradcheck perturbs every entry
    leaves = [cuda(c[n]).requires_grad_() for n in ("x", "W", "bias", "A", "B")]
    scale, index, ranks = cuda(c["scale"]), cuda(c["index"]), cuda(c["ranks"])
    assert torch.autograd.gradcheck(lambda *v: ops.lora_linear(*v, scale, index, ranks), leaves)


def test_opcheck():
    c = {k: cuda(v) for k, v in make_inputs(40, 3, 4, 24, 16, torch.float32, seed=5).items()}
    for v in (c["A"], c["B"]):
        v.nan_to_num_(0.5)
    c["t"].nan_to_num_(0.5)
    lib = torch.ops.adapterhub
    torch.library.opcheck(lib.lora_shrink.default, (c["x"], c["A"], c["index"], c["ranks"]))
    torch.library.opcheck(lib.lora_expand.default, (c["y"], c["t"], c["B"], c["scale"], c["index"], c["ranks"]))
    args = (c["x"], c["W"], c["bias"], c["A"], c["B"], c["scale"], c["index"], c["ranks"])
    torch.library.opcheck(lib.lora_linear.default, args)
    grads = [v.clone().requires_grad_() for v in args[:5]]
    torch.library.opcheck(lib.lora_linear.default, (*grads, *args[5:]))
    grad_y = torch.randn(40, 16, device=DEV)
    torch.library.opcheck(lib.lora_linear_backward.default, (grad_y, c["x"], *args[1:2], *args[3:]))


class AdaptedLinear(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        for name in ("W", "bias", "A", "B", "scale", "ranks"):
            self.register_buffer(name, cuda(c[name]))

    def forward(self, x, index):
        return ops.lora_linear(x, self.W, self.bias, self.A, self.B, self.scale, index, self.ranks)


def test_compile_fullgraph():
    torch._dynamo.reset()
    c = make_inputs(64, 8, 16, 128, 96, torch.bfloat16, seed=7)
    module = AdaptedLinear(c)
    compiled = torch.compile(module, fullgraph=True)
    x, index = cuda(c["x"]), cuda(c["index"])
    got = compiled(x, index)
    torch.testing.assert_close(got, module(x, index))
    expected = reference.lora_linear(
        *map(f64, (c["x"], c["W"], c["bias"], c["A"], c["B"])), c["scale"], c["index"], c["ranks"]
    )
    assert_close(got, expected, torch.bfloat16)


@pytest.mark.parametrize("decode", DECODE_MODES)
@pytest.mark.parametrize("rows", [48, 300])  # BGMV (or fused) and SGMV (grouped on the device, inside the graph)
def test_cuda_graph_replay_follows_index_in_place(rows, decode):
    """Captured once; the index is rewritten in place between replays; out-of-range values act as -1 and
    are raised once, as lora_linear's."""
    slots = 8
    c = make_inputs(rows, slots, 16, 128, 96, torch.bfloat16, seed=9)
    W, bias, A, B, scale, ranks = (cuda(c[n]) for n in ("W", "bias", "A", "B", "scale", "ranks"))
    x, index = cuda(c["x"]), cuda(c["index"])
    with decode_mode(decode):
        graph, y = captured(lambda: ops.lora_linear(x, W, bias, A, B, scale, index, ranks))

    g = torch.Generator().manual_seed(3)
    invalid = torch.randint(-1, slots, (rows,), generator=g)
    invalid[::5] = 99
    invalid[1::7] = -7
    for new in (
        torch.full((rows,), 3),
        torch.randint(-1, slots, (rows,), generator=g),
        torch.full((rows,), -1),
        invalid,
    ):
        index.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        if new is invalid:  # reported from inside the graph too, raised once
            with pytest.raises(ValueError, match="lora_linear: index values must be in"):
                ops.check_routing_errors()
        ops.check_routing_errors()
        effective = torch.where((new >= 0) & (new < slots), new, -1)
        expected = reference.lora_linear(
            *map(f64, (c["x"], c["W"], c["bias"], c["A"], c["B"])), c["scale"], effective, c["ranks"]
        )
        assert_close(y, expected, torch.bfloat16)


# ---- composition: per-row weights and (rows, K) index -------------------------------------


def composed_routing(rows, slots, g):
    """index (rows, 3): shuffled slots and -1 padding, column 2 repeating column 0; weight (rows, 3) in [-1, 2)."""
    first = torch.randint(-1, slots, (rows,), generator=g)
    index = torch.stack([first, torch.randint(-1, slots, (rows,), generator=g), first], 1)
    return index, torch.rand(rows, 3, generator=g) * 3 - 1


@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float64], ids=[*DTYPES.keys(), "fp64"])
@pytest.mark.parametrize("pattern", ["shuffled", "one_slot"])  # 512 rows run SGMV
@pytest.mark.parametrize("rows", [1, 33, 512])
def test_expand_weight_matches_reference(rows, pattern, dtype):
    c = make_inputs(rows, 8, 16, 136, 72, dtype, pattern, seed=seed_of("weight", rows, pattern, dtype))
    weight = torch.rand(rows, generator=torch.Generator().manual_seed(rows)) * 3 - 1
    B, index, ranks, scale = c["B"], c["index"], c["ranks"], c["scale"]
    y = cuda(c["y"].clone())
    ops.lora_expand(y, cuda(c["t"]), cuda(B), cuda(scale), cuda(index), cuda(ranks), cuda(weight))
    expected = c["y"].double()
    reference.lora_expand(expected, c["t"].double(), f64(B), scale, index, ranks, weight)
    untouched = (index == -1) | (ranks[index.clamp(min=0)] == 0)
    assert torch.equal(y.cpu()[untouched], c["y"][untouched])
    assert_close(y, expected, dtype)
    y_none, y_ones = cuda(c["y"].clone()), cuda(c["y"].clone())
    ops.lora_expand(y_none, cuda(c["t"]), cuda(B), cuda(scale), cuda(index), cuda(ranks))
    ops.lora_expand(y_ones, cuda(c["t"]), cuda(B), cuda(scale), cuda(index), cuda(ranks), torch.ones(rows, device=DEV))
    assert torch.equal(y_ones, y_none)  # the weight multiplies scale in fp32: weight 1 changes no bit


@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float64], ids=[*DTYPES.keys(), "fp64"])
@pytest.mark.parametrize("rows", [5, 64])
def test_linear_composed_matches_reference(rows, dtype):
    """index (rows, 3) with -1 padding and a slot repeated across columns, on CUDA vs the CPU float64 reference."""
    g = torch.Generator().manual_seed(seed_of("composed", rows, dtype))
    c = make_inputs(rows, 6, 16, 96, 48, dtype, seed=seed_of("composed", rows, dtype))
    index, weight = composed_routing(rows, 6, g)
    args = (c["x"], c["W"], c["bias"], c["A"], c["B"], c["scale"], index, c["ranks"], weight)
    got = ops.lora_linear(*map(cuda, args))
    assert got.dtype == dtype
    assert_close(got, reference.lora_linear(*map(f64, args[:5]), *args[5:]), dtype)
    ones = torch.ones(rows, 1, device=DEV)
    one_column = ops.lora_linear(*map(cuda, args[:6]), cuda(index[:, :1].contiguous()), cuda(args[7]), ones)
    torch.testing.assert_close(
        one_column, ops.lora_linear(*map(cuda, args[:6]), cuda(index[:, 0].contiguous()), cuda(args[7]))
    )


def test_gradcheck_composed_float64():
    g = torch.Generator().manual_seed(12)
    c = make_inputs(12, 3, 3, 5, 4, torch.float64, seed=12)
    for v in (c["A"], c["B"]):
        v.nan_to_num_(0.5)
    index, weight = (cuda(v) for v in composed_routing(12, 3, g))
    leaves = [cuda(c[n]).requires_grad_() for n in ("x", "W", "bias", "A", "B")]
    scale, ranks = cuda(c["scale"]), cuda(c["ranks"])
    assert torch.autograd.gradcheck(lambda *v: ops.lora_linear(*v, scale, index, ranks, weight), leaves)


def test_opcheck_composed():
    g = torch.Generator().manual_seed(6)
    c = {k: cuda(v) for k, v in make_inputs(40, 3, 4, 24, 16, torch.float32, seed=6).items()}
    for v in (c["A"], c["B"], c["t"]):
        v.nan_to_num_(0.5)
    index, weight = (cuda(v) for v in composed_routing(40, 3, g))
    lib = torch.ops.adapterhub
    torch.library.opcheck(
        lib.lora_expand.default, (c["y"], c["t"], c["B"], c["scale"], c["index"], c["ranks"], weight[:, 0].contiguous())
    )
    args = (c["x"], c["W"], c["bias"], c["A"], c["B"], c["scale"], index, c["ranks"], weight)
    torch.library.opcheck(lib.lora_linear.default, args)
    grads = [v.clone().requires_grad_() for v in args[:5]]
    torch.library.opcheck(lib.lora_linear.default, (*grads, *args[5:]))
    grad_y = torch.randn(40, 16, device=DEV)
    torch.library.opcheck(lib.lora_linear_backward.default, (grad_y, c["x"], *args[1:2], *args[3:]))


def test_cuda_graph_replay_follows_composed_routing_in_place():
    """Captured once with index (rows, 3) and weight; both are rewritten in place between replays."""
    rows, slots = 48, 8
    c = make_inputs(rows, slots, 16, 128, 96, torch.bfloat16, seed=10)
    W, bias, A, B, scale, ranks = (cuda(c[n]) for n in ("W", "bias", "A", "B", "scale", "ranks"))
    g = torch.Generator().manual_seed(4)
    index, weight = (cuda(v) for v in composed_routing(rows, slots, g))
    x = cuda(c["x"])
    graph, y = captured(lambda: ops.lora_linear(x, W, bias, A, B, scale, index, ranks, weight))

    for new_index, new_weight in (composed_routing(rows, slots, g), (torch.full((rows, 3), 3), torch.ones(rows, 3))):
        index.copy_(new_index)
        weight.copy_(new_weight)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.lora_linear(
            *map(f64, (c["x"], c["W"], c["bias"], c["A"], c["B"])), c["scale"], new_index, c["ranks"], new_weight
        )
        assert_close(y, expected, torch.bfloat16)


# ---- lora_linear's fused decode kernel (sm_90+: one launch, a thread block cluster per row) -----------


@pytest.fixture
def fused():
    """lora_delta's and lora_linear's decode batches (< 128 rows) run the fused kernel in the test."""
    with decode_mode("fused"):
        yield


@needs_clusters
@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float64], ids=[*DTYPES.keys(), "fp64"])
@pytest.mark.parametrize("pattern", ["shuffled", "all_none", "one_slot"])
@pytest.mark.parametrize("rows", [1, 33, 127])
@pytest.mark.parametrize("rank", [1, 16, 64])
def test_fused_decode_matches_reference(fused, rank, rows, pattern, dtype):
    """Odd features (scalar loads) for rank 1, vector loads otherwise; NaN in the slots' padding."""
    in_f, out_f = FEATURES[rank]
    c = make_inputs(rows, 8, rank, in_f, out_f, dtype, pattern, seed=seed_of("fused", rank, rows, pattern, dtype))
    args = (c["x"], c["W"], c["bias"], c["A"], c["B"], c["scale"], c["index"], c["ranks"])
    got = ops.lora_linear(*map(cuda, args))
    assert_close(got, reference.lora_linear(*map(f64, args[:5]), *args[5:]), dtype)
    weight = torch.rand(rows, generator=torch.Generator().manual_seed(rows)) * 3 - 1
    check_delta(c, dtype, weight)


@needs_clusters
@pytest.mark.parametrize("in_f, out_f", [(4096, 4096), (4096, 11008), (11008, 4096), (4099, 5)])
def test_fused_decode_large_and_composed(fused, in_f, out_f):
    """Decode shapes of real models, and a (rows, K) index with weights (one fused launch per column)."""
    g = torch.Generator().manual_seed(seed_of("fused large", in_f, out_f))
    c = make_inputs(64, 8, 16, in_f, out_f, torch.bfloat16, seed=seed_of("fused large", in_f, out_f))
    index, weight = composed_routing(64, 8, g)
    for idx, w in ((c["index"], None), (index, weight)):
        args = (c["x"], c["W"], c["bias"], c["A"], c["B"], c["scale"], idx, c["ranks"], w)
        got = ops.lora_linear(*map(cuda, args))
        assert_close(got, reference.lora_linear(*map(f64, args[:5]), *args[5:]), torch.bfloat16)


def test_set_cuda_decode_refuses_unknown_modes():
    from adapterhub import _C

    with pytest.raises(
        (ValueError, RuntimeError), match="set_cuda_decode: mode must be 'fused' or 'split', got 'fast'"
    ):
        _C.set_cuda_decode("fast")
    assert _C.set_cuda_decode("split") == "split"
