"""guidellm's benchmark CLI (`guidellm run`, v0.8's name for `guidellm benchmark`) against `adapterhub
serve` in its default mode: streamed chat completions for an adapter at a constant rate, synthetic
prompts made with the served base's own tokenizer (a local directory: no download), with
stream_options.continuous_usage_stats and ignore_eos; every request must succeed with the asked
number of tokens, as its JSON report counts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from serving import Server, make_model_dir

pytest.importorskip("guidellm")

KEY = "sk-guidellm"
REQUESTS = 20  # at 2 a second: a 10-second run
PROMPT_TOKENS, OUTPUT_TOKENS = 16, 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidellm")
    dirs = make_model_dir(root)
    server = Server(
        [
            "--base",
            str(root / "base"),
            "--served-model-name",
            "tiny",
            "--adapter",
            f"a0={dirs['a0']}",
            "--api-key",
            KEY,
        ],
        cwd=root,
        timeout=60,
    )
    yield server, root
    server.stop()


def test_constant_rate_streaming_benchmark_all_succeed(served):
    server, root = served
    report = root / "benchmarks.json"
    command = [
        sys.executable,
        "-m",
        "guidellm",
        "run",
        "--backend",
        f"kind=openai_http,target={server.url.removesuffix('/v1')},model=a0,api_key={KEY}",
        "--profile",
        "kind=constant,rate=2",
        # a count, not a duration: a duration cancels the request that starts at its end (incomplete)
        "--constraint",
        f"kind=max_requests,count={REQUESTS}",
        "--constraint",
        "kind=max_duration,seconds=30",  # the bound if the server were slow: then requests come out incomplete
        "--data",
        f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
        "--tokenizer",
        f"kind=huggingface_auto,model={root / 'base'}",
        "--output",
        f"kind=json,path={report}",
        "--disable-console-interactive",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}, totals
    requests = benchmark["requests"]
    failed = [r["info"]["error"] for r in requests["errored"] + requests["incomplete"]]
    assert not failed and len(requests["successful"]) == REQUESTS, failed
    assert benchmark["scheduler_metrics"]["requests_made"]["errored"] == 0
    for request in requests["successful"]:
        body = json.loads(request["request_args"])["body"]
        assert body["stream"] and body["stream_options"]["continuous_usage_stats"], body
        assert request["output_tokens"] == OUTPUT_TOKENS, request["output_tokens"]  # usage, with ignore_eos
        assert request["prompt_tokens"] > PROMPT_TOKENS  # the chat template's words too
        assert request["time_to_first_token_ms"] > 0
