"""The gathered low-rank ops against a float64 per-row oracle (tests/conftest.py).

Each op runs through the public wrappers (torch.ops.adapterhub: the C++ kernels when
backend() == "compiled") and through adapterhub.ops.reference called directly (the
fallback's math). tests/test_ops_registration.py reruns this file with the fallback forced.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import TOL, assert_close, make_case, oracle_expand, oracle_linear, oracle_shrink
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub import ops
from adapterhub.ops import reference

IMPLS = {"op": ops, "reference": reference}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def routing(pattern: str, rows: int, slots: int, seed: int) -> torch.Tensor:
    """index (rows,) int64 for a named routing pattern."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "mixed":  # uniform over slots and -1, shuffled
        return torch.randint(-1, slots, (rows,), generator=g)
    if pattern == "all_none":
        return torch.full((rows,), -1)
    if pattern == "one_slot":  # the last slot, to catch slot offsets computed wrong
        return torch.full((rows,), slots - 1)
    if pattern == "runs":  # contiguous runs of one slot (>= 8: GEMM on a range), some slots recur
        index, k = [], 0
        while len(index) < rows:
            length = (9, 1, 2, 12, 3, 8)[k % 6]
            index += [-1 if k % 5 == 4 else k % slots] * length
            k += 1
        return torch.tensor(index[:rows])
    if pattern == "prefill_and_decode":  # two slots with >= 8 rows each, the rest short segments, shuffled
        long = rows // 4
        rest = torch.randint(-1, slots, (rows - 2 * long,), generator=g)
        index = torch.cat([torch.zeros(long, dtype=torch.long), torch.full((long,), slots - 1), rest])
        return index[torch.randperm(rows, generator=g)]
    raise ValueError(pattern)


def per_slot_ranks(slots: int, max_rank: int, seed: int) -> torch.Tensor:
    """Ranks in [1, max_rank], slot 0 at max_rank, slot 2 (if any) at 0."""
    ranks = torch.randint(1, max_rank + 1, (slots,), generator=torch.Generator().manual_seed(seed))
    ranks[0] = max_rank
    if slots > 2:
        ranks[2] = 0
    return ranks


# rows, slots, max_rank, routing pattern, per-slot ranks (NaN padding) or dense, in, out
CASES = [
    (0, 4, 8, "mixed", True, 37, 29),
    (1, 1, 1, "one_slot", False, 37, 29),
    (1, 64, 16, "mixed", True, 37, 29),
    (33, 1, 8, "one_slot", True, 37, 29),
    (33, 64, 64, "mixed", True, 37, 29),
    (33, 4, 16, "all_none", True, 37, 29),
    (33, 8, 8, "runs", True, 37, 29),
    (33, 1, 16, "runs", False, 37, 29),
    (17, 64, 64, "mixed", False, 37, 29),
    (64, 16, 16, "prefill_and_decode", True, 37, 29),
    (40, 4, 8, "prefill_and_decode", True, 7, 300),
    (512, 1, 16, "one_slot", False, 37, 29),
    (512, 64, 64, "prefill_and_decode", True, 37, 29),
    (512, 8, 1, "runs", True, 37, 29),
]


def case_id(c):
    rows, slots, max_rank, pattern, padded, in_f, out_f = c
    return f"rows{rows}-slots{slots}-r{max_rank}-{pattern}-{'ranks' if padded else 'dense'}-{in_f}x{out_f}"


def build(c, dtype, **kwargs):
    rows, slots, max_rank, pattern, padded, in_f, out_f = c
    seed = seed_of(c)
    ranks = per_slot_ranks(slots, max_rank, seed) if padded else None
    return make_case(
        routing(pattern, rows, slots, seed), slots, max_rank, in_f, out_f, dtype, ranks=ranks, seed=seed, **kwargs
    )


def untouched_rows(c) -> torch.Tensor:
    """Rows lora_expand must leave bit-identical: index -1, or a slot of rank 0."""
    none = c.index == -1
    if c.ranks is None:
        return none
    return none | (c.ranks[c.index.clamp(min=0)] == 0)


parametrize_impl = pytest.mark.parametrize("impl", list(IMPLS), ids=list(IMPLS))
parametrize_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
parametrize_case = pytest.mark.parametrize("c", CASES, ids=[case_id(c) for c in CASES])


@parametrize_impl
@parametrize_dtype
@parametrize_case
def test_shrink_matches_oracle(impl, dtype, c):
    case = build(c, dtype)
    t = IMPLS[impl].lora_shrink(case.x, case.A, case.index, case.ranks)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert t.dtype == acc
    assert t.shape == (case.x.size(0), case.A.size(1))
    assert_close(t, oracle_shrink(case.x, case.A, case.index, case.ranks), acc)
    assert torch.all(t[case.index == -1] == 0)


@parametrize_impl
@parametrize_dtype
@parametrize_case
def test_expand_matches_oracle_in_place(impl, dtype, c):
    case = build(c, dtype)
    y = case.y.clone()
    storage = y.data_ptr()
    assert IMPLS[impl].lora_expand(y, case.t, case.B, case.scale, case.index, case.ranks) is None
    assert y.data_ptr() == storage and y.dtype == dtype
    keep = untouched_rows(case)
    assert torch.equal(y[keep], case.y[keep])
    assert_close(y, oracle_expand(case.y, case.t, case.B, case.scale, case.index, case.ranks), dtype)


@parametrize_impl
@parametrize_dtype
@parametrize_case
def test_delta_is_shrink_then_expand(impl, dtype, c):
    """lora_delta gives the bits of lora_expand(lora_shrink(...)) (what it replaces in the adapted layers)."""
    case = build(c, dtype)
    mod = IMPLS[impl]
    y, expected = case.y.clone(), case.y.clone()
    weight = torch.rand(case.x.size(0), generator=torch.Generator().manual_seed(7)) * 2 - 0.5
    assert mod.lora_delta(y, case.x, case.A, case.B, case.scale, case.index, case.ranks, weight) is None
    mod.lora_expand(
        expected,
        mod.lora_shrink(case.x, case.A, case.index, case.ranks),
        case.B,
        case.scale,
        case.index,
        case.ranks,
        weight,
    )
    assert torch.equal(y, expected)
    keep = untouched_rows(case)
    assert torch.equal(y[keep], case.y[keep])


@parametrize_impl
@parametrize_dtype
@parametrize_case
def test_linear_matches_oracle(impl, dtype, c):
    case = build(c, dtype)
    y = IMPLS[impl].lora_linear(*case.linear_args)
    assert y.dtype == dtype and y.shape == (case.x.size(0), case.W.size(0))
    assert_close(y, oracle_linear(*case.linear_args), dtype)


@parametrize_impl
@parametrize_dtype
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("tokens", [None, 5], ids=["x2d", "x3d"])
def test_linear_bias_and_leading_dims(impl, dtype, bias, tokens):
    """x (rows, in), or x (n0, T, in) with index (n0,): entry i routes all of x[i]."""
    index = [0, 2, -1, 1, 0, 2, 1, -1, 2, 2, 0, 1] if tokens else [0, 2, -1, 1] * 5
    case = make_case(
        index,
        slots=3,
        max_rank=4,
        in_f=19,
        out_f=23,
        dtype=dtype,
        ranks=[4, 2, 3],
        seed=seed_of(dtype, bias, tokens),
        tokens=tokens,
    )
    if not bias:
        case.bias = None
    y = IMPLS[impl].lora_linear(*case.linear_args)
    assert y.shape == (*case.x.shape[:-1], 23) and y.dtype == dtype
    assert_close(y, oracle_linear(*case.linear_args), dtype)


@parametrize_impl
def test_linear_accepts_strided_weight_and_bias(impl):
    """Only x, A, B (and the routing tensors) must be contiguous; W and bias may be any view."""
    case = make_case([0, 1, -1, 1, 0], slots=2, max_rank=3, in_f=6, out_f=5, seed=3)
    case.W = case.W.t().contiguous().t()
    case.bias = torch.stack([case.bias, case.bias], 1)[:, 1]
    assert not case.W.is_contiguous() and not case.bias.is_contiguous()
    assert_close(IMPLS[impl].lora_linear(*case.linear_args), oracle_linear(*case.linear_args), torch.float32)


@parametrize_impl
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_zero_padding_without_ranks_equals_true_rank(impl, dtype):
    """ranks=None with zero-padded slots gives each slot's rank-r result."""
    c = (64, 8, 16, "prefill_and_decode", True, 37, 29)
    case = build(c, dtype, padding=0.0)
    ranks, case.ranks = case.ranks, None
    y = IMPLS[impl].lora_linear(*case.linear_args)
    assert_close(y, oracle_linear(*case.linear_args[:-1], ranks), dtype)
    y2 = case.y.clone()
    IMPLS[impl].lora_expand(y2, IMPLS[impl].lora_shrink(case.x, case.A, case.index), case.B, case.scale, case.index)
    t = oracle_shrink(case.x, case.A, case.index, ranks)
    assert_close(y2, oracle_expand(case.y, t, case.B, case.scale, case.index, ranks), dtype)


@parametrize_impl
@pytest.mark.parametrize(
    "slots, max_rank, index, tokens",
    [
        (0, 2, [-1, -1], None),  # no slots at all
        (2, 0, [0, -1, 1], None),  # max_rank 0
        (2, 2, [0, 1], 0),  # x (2, 0, in)
        (2, 2, [], 3),  # x (0, 3, in)
    ],
    ids=["no_slots", "max_rank0", "no_tokens", "no_sequences"],
)
def test_linear_degenerate_shapes(impl, slots, max_rank, index, tokens):
    case = make_case(index, slots, max_rank, in_f=6, out_f=5, seed=8, tokens=tokens)
    y = IMPLS[impl].lora_linear(*case.linear_args)
    assert y.shape == (*case.x.shape[:-1], 5)
    assert_close(y, oracle_linear(*case.linear_args), torch.float32)


@parametrize_impl
def test_linear_four_dim_x(impl):
    case = make_case([0, 1, -1], 2, 3, in_f=6, out_f=5, ranks=[1, 3], seed=9)
    case.x = torch.randn(3, 2, 4, 6, generator=torch.Generator().manual_seed(9))
    assert_close(IMPLS[impl].lora_linear(*case.linear_args), oracle_linear(*case.linear_args), torch.float32)


@parametrize_impl
def test_slot_tensors_may_be_views_into_a_pool(impl):
    """Slot tensors of one layer are often a view (contiguous, with an offset) into a bigger pool; so is y."""
    c = (33, 4, 8, "prefill_and_decode", True, 37, 29)
    case = build(c, torch.float32)
    pool_A, pool_B = torch.randn(3, *case.A.shape), torch.randn(3, *case.B.shape)
    pool_A[1], pool_B[1] = case.A, case.B
    A, B = pool_A[1], pool_B[1]
    assert A.storage_offset() > 0 and A.is_contiguous()
    expected = oracle_linear(*case.linear_args)
    assert_close(
        IMPLS[impl].lora_linear(case.x, case.W, case.bias, A, B, case.scale, case.index, case.ranks),
        expected,
        torch.float32,
    )
    big_y = torch.randn(case.y.size(0) + 4, case.y.size(1))
    big_y[2:-2] = case.y
    before = big_y.clone()
    IMPLS[impl].lora_expand(big_y[2:-2], case.t, B, case.scale, case.index, case.ranks)
    assert torch.equal(big_y[:2], before[:2]) and torch.equal(big_y[-2:], before[-2:])
    assert_close(big_y[2:-2], oracle_expand(case.y, case.t, case.B, case.scale, case.index, case.ranks), torch.float32)


@st.composite
def batches(draw):
    slots = draw(st.integers(1, 5))
    max_rank = draw(st.integers(1, 8))
    rows = draw(st.integers(0, 40))
    ranks = draw(st.none() | st.lists(st.integers(0, max_rank), min_size=slots, max_size=slots))
    index = draw(st.lists(st.integers(-1, slots - 1), min_size=rows, max_size=rows))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return make_case(
        index,
        slots,
        max_rank,
        in_f=draw(st.integers(1, 20)),
        out_f=draw(st.integers(1, 20)),
        dtype=dtype,
        ranks=ranks,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=150, deadline=None)
@given(case=batches())
def test_hypothesis_ops_match_oracle(case):
    dtype = case.x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t_expected = oracle_shrink(case.x, case.A, case.index, case.ranks)
    y_expected = oracle_expand(case.y, case.t, case.B, case.scale, case.index, case.ranks)
    linear_expected = oracle_linear(*case.linear_args)
    for impl in IMPLS.values():
        assert_close(impl.lora_shrink(case.x, case.A, case.index, case.ranks), t_expected, acc)
        y = case.y.clone()
        impl.lora_expand(y, case.t, case.B, case.scale, case.index, case.ranks)
        assert_close(y, y_expected, dtype)
        assert_close(impl.lora_linear(*case.linear_args), linear_expected, dtype)


def grad_case(dtype, tokens=None, padding=3.0):
    """Mixed routing incl. -1, a GEMM-sized segment (slot 1) and per-slot ranks below max_rank."""
    index = [1, 0, 1, -1, 1, 1, 2, 1, 1, 1, -1, 1] if tokens is None else [1, -1, 0, 1, 2]
    return make_case(
        index,
        slots=3,
        max_rank=3,
        in_f=5,
        out_f=4,
        dtype=dtype,
        ranks=[2, 3, 1],
        padding=padding,
        seed=11,
        tokens=tokens,
    )


@pytest.mark.parametrize("tokens", [None, 3], ids=["x2d", "x3d"])
def test_gradcheck_float64(tokens):
    case = grad_case(torch.float64, tokens)
    leaves = [v.clone().requires_grad_() for v in (case.x, case.W, case.bias, case.A, case.B)]

    def f(x, W, bias, A, B):
        return ops.lora_linear(x, W, bias, A, B, case.scale, case.index, case.ranks)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"]
)
@pytest.mark.parametrize("tokens", [None, 4], ids=["x2d", "x3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_grads_match_oracle_autograd(dtype, tokens, bias):
    """Grads of lora_linear for x, W, bias, A, B equal autograd through the oracle; padding gets 0."""
    case = grad_case(dtype, tokens, padding=float("nan"))
    names = ["x", "W", "bias", "A", "B"] if bias else ["x", "W", "A", "B"]
    leaves = {n: getattr(case, n).clone().requires_grad_() for n in names}
    exact = {n: getattr(case, n).double().requires_grad_() for n in names}

    def run(fn, v):
        return fn(v["x"], v["W"], v.get("bias"), v["A"], v["B"], case.scale, case.index, case.ranks)

    y = run(ops.lora_linear, leaves)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(y, list(leaves.values()), grad_y.to(dtype))
    expected = torch.autograd.grad(run(oracle_linear, exact), list(exact.values()), grad_y)
    for name, g, e in zip(names, got, expected):
        assert g.dtype == dtype, name
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(
            g.double(), e, rtol=rtol, atol=2 * atol, msg=lambda m, name=name: f"grad of {name}: {m}"
        )
    grad_A, grad_B = got[names.index("A")], got[names.index("B")]
    for s, r in enumerate(case.ranks.tolist()):
        assert torch.all(grad_A[s, r:] == 0) and torch.all(grad_B[s, :, r:] == 0)


def opcheck_samples():
    """(name, case) pairs: mixed routing with per-slot ranks, 3-D x, bf16, empty and all -1 batches."""
    mixed = [0, 2, -1, 1] + [1] * 9 + [-1, 2]
    return [
        ("mixed_ranks_fp32", make_case(mixed, 3, 4, 6, 5, ranks=[4, 0, 2], padding=0.5, seed=1)),
        ("dense_bf16", make_case(mixed, 3, 4, 6, 5, torch.bfloat16, seed=2)),
        ("x3d_fp64", make_case([1, -1, 0], 2, 2, 6, 5, torch.float64, ranks=[1, 2], padding=0.5, seed=3, tokens=4)),
        ("empty", make_case([], 2, 2, 6, 5, seed=4)),
        ("all_none", make_case([-1] * 5, 2, 2, 6, 5, seed=5)),
    ]


@pytest.mark.parametrize("name, case", opcheck_samples(), ids=[n for n, _ in opcheck_samples()])
def test_opcheck(name, case):
    lib = torch.ops.adapterhub
    x2 = case.x.reshape(-1, case.x.size(-1))
    index = reference.index_per_row(case.index, x2.size(0))
    y = torch.nn.functional.linear(x2, case.W).contiguous()
    t = oracle_shrink(x2, case.A, index, case.ranks).to(case.t.dtype)
    torch.library.opcheck(lib.lora_shrink.default, (x2, case.A, index, case.ranks))
    torch.library.opcheck(lib.lora_expand.default, (y, t, case.B, case.scale, index, case.ranks))
    weight = torch.rand(x2.size(0), generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(lib.lora_delta.default, (y, x2, case.A, case.B, case.scale, index, case.ranks, weight))
    torch.library.opcheck(lib.lora_linear.default, case.linear_args)
    grads = [v.clone().requires_grad_() for v in (case.x, case.W, case.bias, case.A, case.B)]
    torch.library.opcheck(lib.lora_linear.default, (*grads, case.scale, case.index, case.ranks))
    torch.library.opcheck(
        lib.lora_linear_backward.default, (y, x2, case.W, case.A, case.B, case.scale, index, case.ranks)
    )


class AdaptedLinear(torch.nn.Module):
    """A linear layer with slot tensors the way a served model holds them; index comes per call."""

    def __init__(self, case, trainable_adapters=False):
        super().__init__()
        self.W = torch.nn.Parameter(case.W.clone())
        self.bias = torch.nn.Parameter(case.bias.clone())
        if trainable_adapters:
            self.A, self.B = torch.nn.Parameter(case.A.clone()), torch.nn.Parameter(case.B.clone())
        else:
            self.register_buffer("A", case.A.clone())
            self.register_buffer("B", case.B.clone())
        self.register_buffer("scale", case.scale.clone())
        self.register_buffer("ranks", case.ranks.clone())

    def forward(self, x, index):
        return ops.lora_linear(x, self.W, self.bias, self.A, self.B, self.scale, index, self.ranks)


def test_compile_fullgraph_matches_eager_and_swaps_without_recompiling():
    torch._dynamo.reset()
    case = make_case([0, 2, -1, 1] + [1] * 9 + [-1, 2], 3, 4, 6, 5, ranks=[4, 1, 2], seed=21)
    module = AdaptedLinear(case)
    compiled = torch.compile(module, fullgraph=True)
    index = case.index.clone()
    with torch.no_grad():
        assert_close(compiled(case.x, index), module(case.x, index), torch.float32)
        other = make_case(case.index.flip(0), 3, 4, 6, 5, ranks=[4, 1, 2], seed=22)
        with torch._dynamo.config.patch(error_on_recompile=True):
            index.copy_(other.index)  # new routing, same tensor
            module.A.copy_(other.A)  # a swap: new weights copied into the slot tensors
            module.B.copy_(other.B)
            module.scale.copy_(other.scale)
            y = compiled(case.x, index)
            expected = oracle_linear(case.x, case.W, case.bias, other.A, other.B, other.scale, other.index, case.ranks)
            assert_close(y, expected, torch.float32)
            assert_close(compiled(case.x, case.index), module(case.x, case.index), torch.float32)  # a new index tensor


def test_compile_backward_matches_eager():
    torch._dynamo.reset()
    case = grad_case(torch.float32, padding=0.0)
    eager, compiled_module = AdaptedLinear(case, True), AdaptedLinear(case, True)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    x1, x2 = case.x.clone().requires_grad_(), case.x.clone().requires_grad_()
    eager(x1, case.index).square().sum().backward()
    compiled(x2, case.index).square().sum().backward()
    assert_close(x2.grad, x1.grad, torch.float32)
    for (name, p), q in zip(eager.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_compile_dynamic_batch_size_does_not_recompile():
    """A server changes the number of rows every step: one dynamic graph serves them all."""
    torch._dynamo.reset()
    module = AdaptedLinear(make_case([0], 3, 4, 6, 5, ranks=[4, 1, 2], seed=23))
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for step, rows in enumerate((15, 7, 33)):
            case = make_case(routing("mixed", rows, 3, step), 3, 4, 6, 5, ranks=[4, 1, 2], seed=step)
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                y = compiled(case.x, case.index)
            expected = oracle_linear(
                case.x, module.W, module.bias, module.A, module.B, module.scale, case.index, module.ranks
            )
            assert_close(y, expected, torch.float32)


# ---- composition: several (slot, weight) pairs per row --------------------------------------


def composed_case(index, slots, max_rank, dtype=torch.float32, ranks=None, seed=0, tokens=None, weighted=True):
    """A make_case batch routed by `index` (n0,) or (n0, K), with weight of its shape in [-1, 2) or None."""
    index = torch.as_tensor(index, dtype=torch.int64)
    case = make_case([-1] * index.size(0), slots, max_rank, 13, 11, dtype, ranks=ranks, seed=seed, tokens=tokens)
    case.index = index
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.rand(index.shape, generator=g) * 3 - 1 if weighted else None
    return case, weight


def long_columns(rows: int, seed: int) -> list:
    """(rows, 3): column 0 mostly slot 1 (GEMM-sized segments), then mixed; slots recur across columns."""
    g = torch.Generator().manual_seed(seed)
    first = torch.where(torch.rand(rows, generator=g) < 0.7, 1, torch.randint(-1, 4, (rows,), generator=g))
    return torch.stack([first, torch.randint(-1, 4, (rows,), generator=g), first.flip(0)], 1).tolist()


# name -> (index, slots, max_rank, ranks, tokens, weighted)
COMPOSED = {
    "1d_weight": ([0, 2, -1, 1, 0, 2, 1], 3, 4, [4, 2, 3], None, True),
    "k1": ([[0], [2], [-1], [1], [0]], 3, 4, [4, 2, 3], None, True),
    "k2_padded": ([[0, 1], [2, -1], [-1, -1], [1, 0], [-1, 2]], 3, 4, [4, 2, 3], None, True),
    "k3_repeated_slots": ([[1, 1, 0], [0, 2, 1], [2, 2, 2], [-1, 1, 1], [0, -1, 0]], 3, 4, None, None, True),
    "k3_mixed_ranks": ([[0, 3, 2], [3, 1, -1], [2, 0, 3], [1, 1, -1], [-1, -1, 3]], 4, 8, [8, 1, 0, 5], None, True),
    "k2_no_weight": ([[0, 1], [2, -1], [1, 1], [-1, 0]], 3, 4, [1, 4, 2], None, False),
    "k2_x3d": ([[0, 1], [2, -1], [-1, 2], [1, 1]], 3, 4, [4, 2, 3], 3, True),
    "k3_gemm_segments": (long_columns(40, 7), 4, 8, [8, 6, 0, 3], None, True),
    "k2_empty": (torch.empty(0, 2, dtype=torch.int64), 3, 4, [4, 2, 3], None, True),
}


def build_composed(name, dtype):
    index, slots, max_rank, ranks, tokens, weighted = COMPOSED[name]
    return composed_case(index, slots, max_rank, dtype, ranks, seed_of(name, dtype), tokens, weighted)


parametrize_composed = pytest.mark.parametrize("name", list(COMPOSED))


@parametrize_impl
@parametrize_dtype
@parametrize_case
def test_expand_weight_matches_oracle(impl, dtype, c):
    """weight (rows,) multiplies each row's delta; rows with -1 (or rank 0) stay bit-identical."""
    case = build(c, dtype)
    weight = torch.rand(case.y.size(0), generator=torch.Generator().manual_seed(seed_of(c))) * 3 - 1
    y = case.y.clone()
    IMPLS[impl].lora_expand(y, case.t, case.B, case.scale, case.index, case.ranks, weight)
    keep = untouched_rows(case)
    assert torch.equal(y[keep], case.y[keep])
    assert_close(y, oracle_expand(case.y, case.t, case.B, case.scale, case.index, case.ranks, weight), dtype)


@parametrize_impl
@parametrize_dtype
@parametrize_case
def test_expand_unit_weight_is_bit_identical_to_none(impl, dtype, c):
    """weight multiplies in the fp32 (fp64) accumulation, so weight = 1 changes no bit of y."""
    case = build(c, dtype)
    y_none, y_ones = case.y.clone(), case.y.clone()
    IMPLS[impl].lora_expand(y_none, case.t, case.B, case.scale, case.index, case.ranks)
    IMPLS[impl].lora_expand(y_ones, case.t, case.B, case.scale, case.index, case.ranks, torch.ones(case.y.size(0)))
    assert torch.equal(y_ones, y_none)


@parametrize_impl
@parametrize_dtype
@parametrize_composed
def test_linear_composed_matches_oracle(impl, dtype, name):
    case, weight = build_composed(name, dtype)
    y = IMPLS[impl].lora_linear(*case.linear_args, weight)
    assert y.dtype == dtype and y.shape == (*case.x.shape[:-1], case.W.size(0))
    assert_close(y, oracle_linear(*case.linear_args, weight), dtype)


@parametrize_dtype
@parametrize_composed
def test_linear_composed_compiled_agrees_with_fallback(dtype, name):
    """The public op (the C++ kernels when compiled) against the fallback's functions, on the same inputs."""
    case, weight = build_composed(name, dtype)
    assert_close(ops.lora_linear(*case.linear_args, weight), reference.lora_linear(*case.linear_args, weight), dtype)


@parametrize_impl
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_linear_one_column_and_unit_weight_are_bit_identical_to_1d(impl, dtype):
    """index (n0, 1) is index (n0,); weight = 1 (1-D or 2-D) is weight = None."""
    case = build((40, 4, 8, "prefill_and_decode", True, 37, 29), dtype)
    fn = IMPLS[impl].lora_linear
    expected = fn(*case.linear_args)
    column = case.index[:, None].contiguous()
    args = case.linear_args[:-2]
    assert torch.equal(fn(*args, column, case.ranks), expected)
    assert torch.equal(fn(*case.linear_args, torch.ones(case.index.shape)), expected)
    assert torch.equal(fn(*args, column, case.ranks, torch.ones(column.shape)), expected)


@parametrize_impl
def test_linear_columns_add_up(impl):
    """A row composing (s, w1) and (s, w2) gets the delta of (s, w1 + w2); -1 columns add nothing."""
    case, _ = composed_case([[0, 0, -1], [1, 1, -1], [2, 2, -1]], 3, 4, torch.float64, [4, 2, 3], seed=5)
    weight = torch.tensor([[0.25, 0.5, 9.0], [1.0, -2.0, 9.0], [0.0, 0.0, 9.0]])
    merged = torch.tensor([0.75, -1.0, 0.0])
    fn = IMPLS[impl].lora_linear
    split = fn(*case.linear_args[:-2], case.index, case.ranks, weight)
    torch.testing.assert_close(split, fn(*case.linear_args[:-2], case.index[:, 0].contiguous(), case.ranks, merged))


@pytest.mark.parametrize("name", ["k2_padded", "k3_repeated_slots", "k2_x3d", "1d_weight"])
def test_gradcheck_composed_float64(name):
    index, slots, max_rank, ranks, tokens, _ = COMPOSED[name]
    case, weight = composed_case(index, slots, max_rank, torch.float64, ranks, seed=13, tokens=tokens)
    for v in (case.A, case.B):
        v.nan_to_num_(0.5)  # finite padding: gradcheck perturbs every entry
    leaves = [v.clone().requires_grad_() for v in (case.x, case.W, case.bias, case.A, case.B)]

    def f(x, W, bias, A, B):
        return ops.lora_linear(x, W, bias, A, B, case.scale, case.index, case.ranks, weight)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"]
)
@pytest.mark.parametrize("name", ["k3_repeated_slots", "k3_mixed_ranks", "k2_x3d", "k3_gemm_segments"])
def test_composed_grads_match_oracle_autograd(dtype, name):
    """Grads of lora_linear with index (n0, K) and weight: a slot in several rows and columns sums its grads;
    padding beyond a slot's rank gets 0; weight gets none."""
    case, weight = build_composed(name, dtype)
    names = ["x", "W", "bias", "A", "B"]
    leaves = {n: getattr(case, n).clone().requires_grad_() for n in names}
    exact = {n: getattr(case, n).double().requires_grad_() for n in names}
    w = weight.clone().requires_grad_()
    y = ops.lora_linear(*leaves.values(), case.scale, case.index, case.ranks, w)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(y, list(leaves.values()), grad_y.to(dtype))
    expected = torch.autograd.grad(
        oracle_linear(*exact.values(), case.scale, case.index, case.ranks, weight), list(exact.values()), grad_y
    )
    rtol, atol = TOL[dtype]
    for n, g, e in zip(names, got, expected):
        assert g.dtype == dtype, n
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=4 * atol, msg=lambda m, n=n: f"grad of {n}: {m}")
    y = ops.lora_linear(*leaves.values(), case.scale, case.index, case.ranks, w)
    assert torch.autograd.grad(y.sum(), w, allow_unused=True) == (None,)
    if case.ranks is not None:
        for s, r in enumerate(case.ranks.tolist()):
            assert torch.all(got[3][s, r:] == 0) and torch.all(got[4][s, :, r:] == 0)


def composed_opcheck_samples():
    """(name, case, weight): 2-D index with -1 padding, repeated slots, 3-D x, bf16, None weight, K = 1."""
    return [
        ("k2_fp32", *composed_case([[0, 2], [-1, 1], [1, 1], [2, -1]], 3, 4, ranks=[4, 0, 2], seed=1)),
        ("k3_bf16", *composed_case([[0, 2, 1], [-1, 1, 1], [2, -1, 0]], 3, 4, torch.bfloat16, seed=2)),
        ("k2_x3d_fp64", *composed_case([[1, 0], [-1, 1], [0, 0]], 2, 2, torch.float64, [1, 2], seed=3, tokens=4)),
        ("k2_no_weight", *composed_case([[0, 1], [1, -1]], 2, 2, ranks=[2, 1], seed=4, weighted=False)),
        ("k1", *composed_case([[1], [0], [-1]], 2, 2, seed=5)),
        ("1d_weight", *composed_case([1, 0, -1, 1], 2, 2, ranks=[2, 1], seed=6)),
    ]


@pytest.mark.parametrize(
    "name, case, weight", composed_opcheck_samples(), ids=[s[0] for s in composed_opcheck_samples()]
)
def test_opcheck_composed(name, case, weight):
    lib = torch.ops.adapterhub
    for v in (case.A, case.B):
        v.nan_to_num_(0.5)
    x2 = case.x.reshape(-1, case.x.size(-1))
    index = reference.index_per_row(case.index, x2.size(0))
    w = None if weight is None else reference.index_per_row(weight, x2.size(0))
    index0 = index if index.dim() == 1 else index[:, 0].contiguous()
    w0 = None if w is None else (w if w.dim() == 1 else w[:, 0].contiguous())
    y = torch.nn.functional.linear(x2, case.W).contiguous()
    t = oracle_shrink(x2, case.A, index0, case.ranks).to(case.t.dtype)
    torch.library.opcheck(lib.lora_expand.default, (y, t, case.B, case.scale, index0, case.ranks, w0))
    torch.library.opcheck(lib.lora_linear.default, (*case.linear_args, weight))
    grads = [v.clone().requires_grad_() for v in (case.x, case.W, case.bias, case.A, case.B)]
    torch.library.opcheck(lib.lora_linear.default, (*grads, case.scale, case.index, case.ranks, weight))
    torch.library.opcheck(
        lib.lora_linear_backward.default, (y, x2, case.W, case.A, case.B, case.scale, index, case.ranks, w)
    )


class ComposedLinear(AdaptedLinear):
    """AdaptedLinear whose rows compose K (slot, weight) pairs, both given per call."""

    def forward(self, x, index, weight):
        return ops.lora_linear(x, self.W, self.bias, self.A, self.B, self.scale, index, self.ranks, weight)


def test_compile_composed_new_pairs_do_not_recompile():
    """New (slot, weight) values, in place or in new tensors of the same shapes, reuse the compiled graph."""
    torch._dynamo.reset()
    case, weight = composed_case([[0, 2], [-1, 1], [1, 1], [2, -1]], 3, 4, ranks=[4, 1, 2], seed=31)
    module = ComposedLinear(case)
    compiled = torch.compile(module, fullgraph=True)
    index = case.index.clone()
    with torch.no_grad():
        assert_close(compiled(case.x, index, weight), module(case.x, index, weight), torch.float32)
        with torch._dynamo.config.patch(error_on_recompile=True):
            g = torch.Generator().manual_seed(32)
            for _ in range(3):
                new_index = torch.randint(-1, 3, index.shape, generator=g)
                new_weight = torch.rand(weight.shape, generator=g) * 2 - 1
                index.copy_(new_index)
                weight.copy_(new_weight)
                expected = oracle_linear(*case.linear_args[:-2], new_index, case.ranks, new_weight)
                assert_close(compiled(case.x, index, weight), expected, torch.float32)
                assert_close(compiled(case.x, new_index, new_weight), expected, torch.float32)
