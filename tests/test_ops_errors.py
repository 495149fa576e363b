"""Bad input to the ops gives a ValueError that names the argument and says expected vs got,
from every backend, and leaves the inputs as they were.

Backends: "op" (torch.ops.adapterhub: the C++ kernels when compiled), "reference" (the
fallback's functions called directly) and "fake" (the fake kernels torch.compile traces with,
which see no data: index and ranks values are not checked there).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from adapterhub.ops import backend, reference

ARGS = {
    "lora_shrink": ("x", "A", "index", "ranks"),
    "lora_expand": ("y", "t", "B", "scale", "index", "ranks", "weight"),
    "lora_delta": ("y", "x", "A", "B", "scale", "index", "ranks", "weight"),
    "lora_linear": ("x", "W", "bias", "A", "B", "scale", "index", "ranks", "weight"),
    "lora_linear_backward": ("grad_y", "x", "W", "A", "B", "scale", "index", "ranks", "weight"),
}
BACKENDS = ["op", "reference", "fake"]


def valid_args() -> dict:
    """4 rows, in 6, out 5, 3 slots of max_rank 2; row 0 is valid so a late check would show in y."""
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(4, 6, generator=g),
        W=torch.randn(5, 6, generator=g),
        bias=torch.randn(5, generator=g),
        A=torch.randn(3, 2, 6, generator=g),
        B=torch.randn(3, 5, 2, generator=g),
        scale=torch.rand(3, generator=g),
        index=torch.tensor([0, 1, 2, -1]),
        ranks=None,
        weight=None,
        y=torch.randn(4, 5, generator=g),
        t=torch.randn(4, 2, generator=g),
        grad_y=torch.randn(4, 5, generator=g),
    )


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view."""
    out = torch.empty(*t.shape, 2, dtype=t.dtype)[..., 0]
    return out.copy_(t)


@dataclass
class Bad:
    op: str
    change: dict  # argument -> function of the valid arguments giving the bad value
    says: list  # fragments the message must hold: the argument, expected and got
    reads_values: bool = False  # a check of index / ranks values: not visible to the fake kernels


SHRINK, EXPAND, LINEAR, BACKWARD = "lora_shrink", "lora_expand", "lora_linear", "lora_linear_backward"
DELTA = "lora_delta"

CASES = {
    # wrong dtype
    "shrink-A-bf16": Bad(SHRINK, {"A": lambda a: a["A"].bfloat16()}, ["A must be Float", "got BFloat16"]),
    "shrink-x-int": Bad(
        SHRINK, {"x": lambda a: a["x"].long()}, ["x must be float32, float64, bfloat16 or float16", "got Long"]
    ),
    "shrink-index-int32": Bad(SHRINK, {"index": lambda a: a["index"].int()}, ["index must be Long", "got Int"]),
    "shrink-ranks-int32": Bad(
        SHRINK, {"ranks": lambda a: torch.tensor([1, 2, 2], dtype=torch.int32)}, ["ranks must be Long", "got Int"]
    ),
    "expand-B-bf16": Bad(EXPAND, {"B": lambda a: a["B"].bfloat16()}, ["B must be Float", "got BFloat16"]),
    "expand-scale-fp64": Bad(EXPAND, {"scale": lambda a: a["scale"].double()}, ["scale must be Float", "got Double"]),
    "expand-t-bf16": Bad(EXPAND, {"t": lambda a: a["t"].bfloat16()}, ["t must be Float", "got BFloat16"]),
    "expand-t-fp32-for-fp64": Bad(
        EXPAND, {"y": lambda a: a["y"].double(), "B": lambda a: a["B"].double()}, ["t must be Double", "got Float"]
    ),
    "linear-A-bf16": Bad(LINEAR, {"A": lambda a: a["A"].bfloat16()}, ["A must be Float", "got BFloat16"]),
    "linear-B-fp16": Bad(LINEAR, {"B": lambda a: a["B"].half()}, ["B must be Float", "got Half"]),
    "linear-W-fp64": Bad(LINEAR, {"W": lambda a: a["W"].double()}, ["W must be Float", "got Double"]),
    "linear-bias-fp16": Bad(LINEAR, {"bias": lambda a: a["bias"].half()}, ["bias must be Float", "got Half"]),
    "linear-scale-fp64": Bad(LINEAR, {"scale": lambda a: a["scale"].double()}, ["scale must be Float", "got Double"]),
    "linear-index-int32": Bad(LINEAR, {"index": lambda a: a["index"].int()}, ["index must be Long", "got Int"]),
    "backward-A-bf16": Bad(BACKWARD, {"A": lambda a: a["A"].bfloat16()}, ["A must be Float", "got BFloat16"]),
    "backward-grad_y-fp64": Bad(
        BACKWARD, {"grad_y": lambda a: a["grad_y"].double()}, ["grad_y must be Float", "got Double"]
    ),
    "delta-B-bf16": Bad(DELTA, {"B": lambda a: a["B"].bfloat16()}, ["B must be Float", "got BFloat16"]),
    "delta-y-fp64": Bad(DELTA, {"y": lambda a: a["y"].double()}, ["y must be Float", "got Double"]),
    "delta-weight-fp64": Bad(DELTA, {"weight": lambda a: torch.ones(4, dtype=torch.float64)}, ["weight must be Float"]),
    # wrong shape
    "delta-y-rows": Bad(DELTA, {"y": lambda a: torch.randn(3, 5)}, ["y.size(0)", "must be 4, got 3"]),
    "delta-B-out": Bad(DELTA, {"B": lambda a: torch.randn(3, 4, 2)}, ["B.size(1)", "must be 5, got 4"]),
    "delta-B-rank": Bad(DELTA, {"B": lambda a: torch.randn(3, 5, 3)}, ["B.size(2)", "must be 2, got 3"]),
    "delta-index-2d": Bad(DELTA, {"index": lambda a: torch.zeros(4, 2, dtype=torch.long)}, ["index must be 1-D"]),
    "delta-y-strided": Bad(DELTA, {"y": lambda a: strided(a["y"])}, ["y must be contiguous"]),
    "delta-index-high": Bad(
        DELTA,
        {"index": lambda a: torch.tensor([0, 1, 3, -1])},
        ["index values must be in [-1, 3)", "got 3 at row 2"],
        reads_values=True,
    ),
    "delta-ranks-high": Bad(
        DELTA,
        {"ranks": lambda a: torch.tensor([2, 3, 1])},
        ["ranks values must be in [0, max_rank = 2]", "got 3 for slot 1"],
        reads_values=True,
    ),
    "shrink-A-in": Bad(SHRINK, {"A": lambda a: torch.randn(3, 2, 7)}, ["A.size(2)", "must be 6, got 7"]),
    "shrink-A-2d": Bad(SHRINK, {"A": lambda a: a["A"][0]}, ["A must be 3-D", "got shape [2, 6]"]),
    "shrink-index-length": Bad(
        SHRINK, {"index": lambda a: a["index"][:3]}, ["index has 3 entries but the batch has 4 rows"]
    ),
    "shrink-ranks-length": Bad(
        SHRINK, {"ranks": lambda a: torch.tensor([1, 2])}, ["ranks.size(0)", "must be 3, got 2"]
    ),
    "expand-B-out": Bad(EXPAND, {"B": lambda a: torch.randn(3, 4, 2)}, ["B.size(1)", "must be 5, got 4"]),
    "expand-t-rank": Bad(EXPAND, {"t": lambda a: torch.randn(4, 3)}, ["t.size(1)", "must be 2, got 3"]),
    "expand-t-rows": Bad(EXPAND, {"t": lambda a: torch.randn(3, 2)}, ["t.size(0)", "must be 4, got 3"]),
    "expand-scale-length": Bad(EXPAND, {"scale": lambda a: torch.rand(2)}, ["scale.size(0)", "must be 3, got 2"]),
    "expand-index-length": Bad(
        EXPAND, {"index": lambda a: torch.tensor([0, 1, 2, -1, 0])}, ["index has 5 entries", "4 rows"]
    ),
    "linear-A-in": Bad(LINEAR, {"A": lambda a: torch.randn(3, 2, 7)}, ["A.size(2)", "must be 6, got 7"]),
    "linear-W-in": Bad(LINEAR, {"W": lambda a: torch.randn(5, 7)}, ["W.size(1)", "must be 6, got 7"]),
    "linear-B-out": Bad(LINEAR, {"B": lambda a: torch.randn(3, 4, 2)}, ["B.size(1)", "must be 5, got 4"]),
    "linear-B-rank": Bad(LINEAR, {"B": lambda a: torch.randn(3, 5, 3)}, ["B.size(2)", "must be 2, got 3"]),
    "linear-B-slots": Bad(LINEAR, {"B": lambda a: torch.randn(2, 5, 2)}, ["B.size(0)", "must be 3, got 2"]),
    "linear-bias-length": Bad(LINEAR, {"bias": lambda a: torch.randn(4)}, ["bias.size(0)", "must be 5, got 4"]),
    "linear-scale-length": Bad(LINEAR, {"scale": lambda a: torch.rand(4)}, ["scale.size(0)", "must be 3, got 4"]),
    "linear-x-1d": Bad(
        LINEAR, {"x": lambda a: a["x"][0]}, ["x must be (rows, in) or (batch, ..., in)", "got shape [6]"]
    ),
    "linear-index-per-token": Bad(
        LINEAR, {"x": lambda a: a["x"].view(2, 2, 6)}, ["index has 4 entries but the batch has 2 rows"]
    ),
    "backward-grad_y-out": Bad(
        BACKWARD, {"grad_y": lambda a: torch.randn(4, 4)}, ["grad_y.size(1)", "must be 5, got 4"]
    ),
    "backward-grad_y-rows": Bad(
        BACKWARD, {"grad_y": lambda a: torch.randn(3, 5)}, ["grad_y.size(0)", "must be 4, got 3"]
    ),
    "backward-x-3d": Bad(
        BACKWARD,
        {"x": lambda a: a["x"].view(2, 2, 6), "index": lambda a: a["index"][:2]},
        ["x must be 2-D", "got shape [2, 2, 6]"],
    ),
    # wrong device (meta; a CUDA device is tested in test_cuda_tensor_with_cpu_x)
    "shrink-A-meta": Bad(SHRINK, {"A": lambda a: a["A"].to("meta")}, ["A is on meta but x is on cpu"]),
    # index out of range, ranks out of [0, max_rank]
    "shrink-index-slots": Bad(
        SHRINK,
        {"index": lambda a: torch.tensor([0, 1, 3, -1])},
        ["index values must be in [-1, 3)", "got 3 at row 2"],
        reads_values=True,
    ),
    "shrink-index-below": Bad(
        SHRINK,
        {"index": lambda a: torch.tensor([0, 1, -2, -1])},
        ["index values must be in [-1, 3)", "got -2 at row 2"],
        reads_values=True,
    ),
    "shrink-ranks-above": Bad(
        SHRINK,
        {"ranks": lambda a: torch.tensor([2, 3, 1])},
        ["ranks values must be in [0, max_rank = 2]", "got 3 for slot 1"],
        reads_values=True,
    ),
    "shrink-ranks-negative": Bad(
        SHRINK,
        {"ranks": lambda a: torch.tensor([2, -1, 1])},
        ["ranks values must be in [0, max_rank = 2]", "got -1 for slot 1"],
        reads_values=True,
    ),
    "expand-index-slots": Bad(
        EXPAND,
        {"index": lambda a: torch.tensor([0, 1, 3, -1])},
        ["index values must be in [-1, 3)", "got 3 at row 2"],
        reads_values=True,
    ),
    "expand-index-below": Bad(
        EXPAND,
        {"index": lambda a: torch.tensor([0, 1, -5, -1])},
        ["index values must be in [-1, 3)", "got -5 at row 2"],
        reads_values=True,
    ),
    "expand-ranks-above": Bad(
        EXPAND,
        {"ranks": lambda a: torch.tensor([2, 3, 1])},
        ["ranks values must be in [0, max_rank = 2]", "got 3 for slot 1"],
        reads_values=True,
    ),
    "linear-index-slots": Bad(
        LINEAR,
        {"index": lambda a: torch.tensor([0, 1, 7, -1])},
        ["index values must be in [-1, 3)", "got 7 at row 2"],
        reads_values=True,
    ),
    "linear-ranks-negative": Bad(
        LINEAR,
        {"ranks": lambda a: torch.tensor([2, -1, 1])},
        ["ranks values must be in [0, max_rank = 2]", "got -1 for slot 1"],
        reads_values=True,
    ),
    "backward-index-slots": Bad(
        BACKWARD,
        {"index": lambda a: torch.tensor([0, 1, 3, -1])},
        ["index values must be in [-1, 3)", "got 3 at row 2"],
        reads_values=True,
    ),
    # not contiguous
    "shrink-x-strided": Bad(SHRINK, {"x": lambda a: strided(a["x"])}, ["x must be contiguous", "strides [12, 2]"]),
    "shrink-A-strided": Bad(SHRINK, {"A": lambda a: strided(a["A"])}, ["A must be contiguous"]),
    "shrink-index-strided": Bad(SHRINK, {"index": lambda a: strided(a["index"])}, ["index must be contiguous"]),
    "expand-y-strided": Bad(EXPAND, {"y": lambda a: strided(a["y"])}, ["y must be contiguous"]),
    "expand-t-strided": Bad(EXPAND, {"t": lambda a: strided(a["t"])}, ["t must be contiguous"]),
    "expand-B-strided": Bad(EXPAND, {"B": lambda a: strided(a["B"])}, ["B must be contiguous"]),
    "linear-x-strided": Bad(LINEAR, {"x": lambda a: strided(a["x"])}, ["x must be contiguous"]),
    "linear-A-strided": Bad(LINEAR, {"A": lambda a: strided(a["A"])}, ["A must be contiguous"]),
    "linear-B-strided": Bad(LINEAR, {"B": lambda a: strided(a["B"])}, ["B must be contiguous"]),
    "linear-scale-strided": Bad(LINEAR, {"scale": lambda a: strided(a["scale"])}, ["scale must be contiguous"]),
    # per-row weights and 2-D (rows, K) index: lora_linear and its backward only
    "expand-weight-fp64": Bad(
        EXPAND, {"weight": lambda a: torch.ones(4, dtype=torch.float64)}, ["weight must be Float", "got Double"]
    ),
    "expand-weight-length": Bad(EXPAND, {"weight": lambda a: torch.ones(3)}, ["weight.size(0)", "must be 4, got 3"]),
    "expand-weight-2d": Bad(
        EXPAND,
        {"weight": lambda a: torch.ones(4, 2)},
        ["weight must be 1-D (rows,), the shape of index", "got shape [4, 2]"],
    ),
    "expand-weight-strided": Bad(EXPAND, {"weight": lambda a: strided(torch.ones(4))}, ["weight must be contiguous"]),
    "expand-weight-meta": Bad(
        EXPAND, {"weight": lambda a: torch.ones(4, device="meta")}, ["weight is on meta but x is on cpu"]
    ),
    "expand-index-2d": Bad(
        EXPAND,
        {"index": lambda a: a["index"][:, None].repeat(1, 2)},
        ["index must be 1-D (rows,), got shape [4, 2]", "only lora_linear takes (rows, K)", "lora_expand once"],
    ),
    "shrink-index-2d": Bad(
        SHRINK,
        {"index": lambda a: a["index"][:, None].repeat(1, 2)},
        ["index must be 1-D (rows,), got shape [4, 2]", "only lora_linear takes (rows, K)", "lora_shrink once"],
    ),
    "linear-index-3d": Bad(
        LINEAR,
        {"index": lambda a: a["index"].view(4, 1, 1)},
        ["index must be 1-D (rows,) or 2-D (rows, K)", "got shape [4, 1, 1]"],
    ),
    "linear-index-k0": Bad(
        LINEAR,
        {"index": lambda a: torch.empty(4, 0, dtype=torch.int64)},
        ["index (rows, K) needs K >= 1", "got shape [4, 0]"],
    ),
    "linear-index-2d-rows": Bad(
        LINEAR,
        {"index": lambda a: torch.zeros(3, 2, dtype=torch.int64)},
        ["index has 3 entries but the batch has 4 rows"],
    ),
    "linear-index-2d-strided": Bad(
        LINEAR,
        {"index": lambda a: torch.zeros(2, 4, dtype=torch.int64).t()},
        ["index must be contiguous", "strides [1, 4]"],
    ),
    "linear-index-2d-int32": Bad(
        LINEAR, {"index": lambda a: torch.zeros(4, 2, dtype=torch.int32)}, ["index must be Long", "got Int"]
    ),
    "linear-weight-1d-for-2d": Bad(
        LINEAR,
        {"index": lambda a: torch.zeros(4, 2, dtype=torch.int64), "weight": lambda a: torch.ones(4)},
        ["weight must be 2-D (rows, K), the shape of index", "got shape [4]"],
    ),
    "linear-weight-2d-for-1d": Bad(
        LINEAR,
        {"weight": lambda a: torch.ones(4, 1)},
        ["weight must be 1-D (rows,), the shape of index", "got shape [4, 1]"],
    ),
    "linear-weight-columns": Bad(
        LINEAR,
        {"index": lambda a: torch.zeros(4, 2, dtype=torch.int64), "weight": lambda a: torch.ones(4, 3)},
        ["weight.size(1) (K, = index.size(1)) must be 2, got 3"],
    ),
    "linear-weight-rows": Bad(
        LINEAR,
        {"index": lambda a: torch.zeros(4, 2, dtype=torch.int64), "weight": lambda a: torch.ones(3, 2)},
        ["weight.size(0) (rows, = index.size(0)) must be 4, got 3"],
    ),
    "linear-weight-fp16": Bad(
        LINEAR, {"weight": lambda a: torch.ones(4, dtype=torch.float16)}, ["weight must be Float", "got Half"]
    ),
    "linear-weight-strided": Bad(
        LINEAR,
        {"index": lambda a: torch.zeros(4, 2, dtype=torch.int64), "weight": lambda a: torch.ones(2, 4).t()},
        ["weight must be contiguous"],
    ),
    "linear-index-2d-slots": Bad(
        LINEAR,
        {"index": lambda a: torch.tensor([[0, -1], [1, 3], [2, 2], [-1, -1]])},
        ["index values must be in [-1, 3)", "got 3 at row 1, column 1"],
        reads_values=True,
    ),
    "backward-index-k0": Bad(
        BACKWARD,
        {"index": lambda a: torch.empty(4, 0, dtype=torch.int64)},
        ["index (rows, K) needs K >= 1", "got shape [4, 0]"],
    ),
    "backward-weight-1d-for-2d": Bad(
        BACKWARD,
        {"index": lambda a: torch.zeros(4, 2, dtype=torch.int64), "weight": lambda a: torch.ones(4)},
        ["weight must be 2-D (rows, K), the shape of index", "got shape [4]"],
    ),
    "backward-index-2d-slots": Bad(
        BACKWARD,
        {"index": lambda a: torch.tensor([[0, 1], [1, 1], [-2, 0], [-1, -1]])},
        ["index values must be in [-1, 3)", "got -2 at row 2, column 0"],
        reads_values=True,
    ),
}


def bad_args(bad: Bad) -> dict:
    args = valid_args()
    for name, make in bad.change.items():
        args[name] = make(args)
    return {name: args[name] for name in ARGS[bad.op]}


def call(where: str, op: str, args: dict):
    if where == "reference":
        return getattr(reference, op)(*args.values())
    if where == "op":
        return getattr(torch.ops.adapterhub, op)(*args.values())
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in args.values()]
        return getattr(torch.ops.adapterhub, op)(*fake)


def params(*backends: str):
    """pytest params (bad, where) for each case the backends can see."""
    for where in backends:
        for name, bad in CASES.items():
            if where == "fake" and bad.reads_values:
                continue
            yield pytest.param(bad, where, id=f"{name}-{where}")


@pytest.mark.parametrize("bad, where", list(params(*BACKENDS)))
def test_bad_input_raises_clear_value_error(bad, where):
    args = bad_args(bad)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    with pytest.raises(ValueError) as error:
        call(where, bad.op, args)
    message = str(error.value)
    assert message.startswith(bad.op + ": "), message
    for fragment in bad.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for name, value in before.items():
        assert torch.equal(args[name], value), f"{name} changed by a call that failed"


@pytest.mark.skipif(backend() != "compiled", reason="compares the compiled kernels' messages with the fallback's")
@pytest.mark.parametrize("bad", [pytest.param(p.values[0], id=p.id, marks=p.marks) for p in params("reference")])
def test_compiled_and_fallback_say_the_same(bad):
    messages = []
    for where in ("op", "reference"):
        with pytest.raises(ValueError) as error:
            call(where, bad.op, bad_args(bad))
        messages.append(str(error.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    "name",
    [
        "linear-A-bf16",
        "linear-B-rank",
        "linear-x-strided",
        "expand-t-rank",
        "shrink-index-int32",
        "linear-weight-1d-for-2d",
        "expand-weight-length",
        "delta-B-rank",
        "delta-y-strided",
    ],
)
def test_compiled_graph_reports_the_error(name):
    """torch.compile traces with the fake kernels: the same message, raised while compiling."""
    torch._dynamo.reset()
    bad = CASES[name]
    op = getattr(torch.ops.adapterhub, bad.op)
    compiled = torch.compile(lambda *args: op(*args), fullgraph=True, backend="eager")
    with pytest.raises(Exception) as error:
        compiled(*bad_args(bad).values())
    message = str(error.value)
    assert "ValueError" in message or isinstance(error.value, ValueError), message
    for fragment in bad.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("where", ["op", "reference"])
def test_cuda_tensor_with_cpu_x(where):
    args = bad_args(Bad(SHRINK, {"A": lambda a: a["A"].cuda()}, []))
    with pytest.raises(ValueError, match=r"A is on cuda:0 but x is on cpu"):
        call(where, SHRINK, args)
