"""Which backend runs the ops, and that both register the schemas of adapterhub/ops/schemas.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterhub.ops import backend
from adapterhub.ops.schemas import SCHEMAS

ROOT = Path(__file__).resolve().parents[1]
BUILT = importlib.util.find_spec("adapterhub._C") is not None


def run(args: list[str], force_fallback: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADAPTERHUB_FORCE_FALLBACK": force_fallback}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_registered_schemas_are_schemas_py():
    for name, schema in SCHEMAS.items():
        registered = getattr(torch.ops.adapterhub, name).default._schema
        assert str(registered) == str(torch._C.parse_schema(f"adapterhub::{schema}")), name


def test_routing_arguments_end_the_schemas():
    """Every op ends with the optional routing tensors; lora_shrink takes no weight (it stays per column)."""
    for name, tail in [
        ("lora_shrink", ["index", "ranks"]),
        ("lora_expand", ["index", "ranks", "weight"]),
        ("lora_delta", ["index", "ranks", "weight"]),
        ("lora_linear", ["index", "ranks", "weight"]),
        ("lora_linear_backward", ["index", "ranks", "weight"]),
    ]:
        arguments = getattr(torch.ops.adapterhub, name).default._schema.arguments
        assert [a.name for a in arguments[-len(tail) :]] == tail, name
        for a in arguments[-len(tail) + 1 :]:
            assert a.default_value is None and str(a.type) == "Optional[Tensor]", (name, a.name)


def test_namespace_holds_exactly_the_documented_ops():
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("adapterhub::")}
    assert names == {f"adapterhub::{name}" for name in SCHEMAS}


@pytest.mark.skipif(os.environ.get("ADAPTERHUB_EXPECT_COMPILED") != "1", reason="set by `make test`")
def test_make_test_runs_the_compiled_kernels():
    """`make test` builds the extension: a run that silently fell back would test the wrong code."""
    assert BUILT and backend() == "compiled"


def test_backend_matches_environment():
    forced = os.environ.get("ADAPTERHUB_FORCE_FALLBACK", "0") not in ("", "0")
    assert backend() == ("compiled" if BUILT and not forced else "fallback")


@pytest.mark.skipif(backend() != "compiled", reason="the extension is not built or not used")
def test_compiled_backend_dispatches_to_the_cpp_kernels():
    for name, source in [
        ("lora_shrink", "lora_cpu.cpp"),
        ("lora_expand", "lora_cpu.cpp"),
        ("lora_delta", "lora_linear.cpp"),
        ("lora_linear", "lora_linear.cpp"),
        ("lora_linear_backward", "lora_linear.cpp"),
    ]:
        assert source in torch._C._dispatch_dump(f"adapterhub::{name}"), name


@pytest.mark.parametrize("force, expected", [("1", "fallback"), ("0", "compiled" if BUILT else "fallback")])
def test_backend_in_a_fresh_process(force, expected):
    code = (
        "import torch, adapterhub; from adapterhub.ops.schemas import SCHEMAS; print(adapterhub.backend()); "
        "print(all(str(getattr(torch.ops.adapterhub, n).default._schema) == "
        "str(torch._C.parse_schema('adapterhub::' + s)) for n, s in SCHEMAS.items()))"
    )
    result = run(["-c", code], force)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected, "True"]


@pytest.mark.skipif(backend() == "fallback", reason="this run already tests the fallback")
def test_fallback_passes_the_op_tests():
    """The correctness and error tests again, with ADAPTERHUB_FORCE_FALLBACK=1."""
    result = run(
        [
            "-m",
            "pytest",
            "tests/test_ops_correctness.py",
            "tests/test_ops_errors.py",
            "tests/test_ops_registration.py::test_backend_matches_environment",
            "-x",
            "-p",
            "no:cacheprovider",
        ],
        "1",
        timeout=600,
    )
    assert "adapterhub backend: fallback" in result.stdout
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
