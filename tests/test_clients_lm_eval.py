"""lm-evaluation-harness against `adapterhub serve`: its `local-completions` model (the remote tokenizer:
our /tokenizer_info, /tokenize and /detokenize; token-id prompts; loglikelihoods from echo + logprobs)
scores a tiny local task (tests/fixtures/lm_eval) for an adapter exactly as lm-eval's own `hf` model
does with `pretrained=<base>,peft=<the adapter>`: the same generations, item by item, and the same
loglikelihoods (within 1e-3) and accuracy, for a LoRA and an IA3 adapter."""

from __future__ import annotations

import pathlib

import pytest
from serving import Server, make_model_dir, pad_tokenizer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

TASKS = pathlib.Path(__file__).parent / "fixtures" / "lm_eval"
ADAPTERS = ["a0", "a1"]  # a0: LoRA r=4 on every projection; a1: IA3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    dirs = make_model_dir(root)
    pad_tokenizer(root / "base")
    server = Server(
        [
            "--base",
            str(root / "base"),
            "--served-model-name",
            "tiny",
            *(x for name in ADAPTERS for x in ("--adapter", f"{name}={dirs[name]}")),
            "--max-adapters",
            "2",
            "--max-rank",
            "8",
        ],
        cwd=root,
        timeout=60,
    )
    yield server, root / "base", dirs
    server.stop()


def evaluate(model: str, model_args, task: str) -> tuple[dict, list[dict]]:
    """(metrics, samples in document order) of one task, nothing cached between runs."""
    result = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),  # not the 10,000s of built-in tasks
        bootstrap_iters=0,
        log_samples=True,
    )
    return result["results"][task], sorted(result["samples"][task], key=lambda s: s["doc_id"])


def both(served, adapter: str, task: str):
    """The task scored through the server (model=<adapter>) and by lm-eval's hf model with peft."""
    server, base, dirs = served
    remote = {
        "model": adapter,
        "base_url": server.url + "/completions",
        "tokenizer_backend": "remote",  # /tokenizer_info, /tokenize, /detokenize; no tokenizer named like the model
        "max_retries": 1,  # a refused request fails the test at once instead of after backed-off retries
        "timeout": 60,
    }
    local = f"pretrained={base},peft={dirs[adapter]},device=cpu,dtype=float32"
    return evaluate("local-completions", remote, task), evaluate("hf", local, task)


def test_remote_tokenizer_is_detected_and_agrees(served):
    """What tokenizer_backend="auto" checks before it picks "remote", and what "remote" then gives."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support
    from transformers import AutoTokenizer

    server, base, _ = served
    assert check_remote_tokenizer_support(server.url + "/completions")
    remote, local = RemoteTokenizer(server.url + "/completions"), AutoTokenizer.from_pretrained(base)
    text = "Q: 2 + 2 = A: 4"
    assert remote.encode(text) == local(text, add_special_tokens=False)["input_ids"]
    assert remote.decode(remote.encode(text)) == text
    assert (remote.eos_token, remote.eos_token_id, remote.bos_token) == ("<eos>", 1, None)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_multiple_choice_equals_hf_peft(served, adapter):
    (metrics, samples), (hf_metrics, hf_samples) = both(served, adapter, "tiny_mc")
    assert [s["arguments"] for s in samples] == [s["arguments"] for s in hf_samples]
    for s, hf in zip(samples, hf_samples):
        got, expected = [ll for ll, _ in s["filtered_resps"]], [ll for ll, _ in hf["filtered_resps"]]
        assert got == pytest.approx(expected, abs=1e-3), (s["doc"], got, expected)
        assert [g for _, g in s["filtered_resps"]] == [g for _, g in hf["filtered_resps"]], s["doc"]
    assert metrics["acc,none"] == hf_metrics["acc,none"]
    assert len(samples) == 12


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_generate_until_equals_hf_peft(served, adapter):
    (metrics, samples), (hf_metrics, hf_samples) = both(served, adapter, "tiny_gen")
    assert [s["arguments"] for s in samples] == [s["arguments"] for s in hf_samples]
    got, expected = [s["filtered_resps"] for s in samples], [s["filtered_resps"] for s in hf_samples]
    assert got == expected
    assert metrics["exact_match,none"] == hf_metrics["exact_match,none"]
    assert len(samples) == 12 and any(r[0] for r in got), "some generation is not empty"
