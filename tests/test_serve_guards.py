"""`adapterhub serve` protecting its tenants, as a real subprocess: bad values refused where the
request is parsed (400 naming the field), every error in OpenAI's shape (the framework's too),
tenants seeing only their own models and no server paths, 429 with Retry-After under a burst while
another key still gets in, requests stopped when their client disconnects or their deadline passes,
and SIGTERM draining the requests in flight before the process exits."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import httpx
import pytest
from serving import Server, make_model_dir, metric, served_llama
from tiny_models import tiny_tokenizer

ADMIN = {"Authorization": "Bearer sk-admin"}
A = {"Authorization": "Bearer sk-a"}
B = {"Authorization": "bearer sk-b"}  # the scheme is case-insensitive


def _long_base(root):
    """The tiny served model with room for long generations (its rotary positions have no limit)."""
    model = served_llama()
    model.config.max_position_embeddings = 4096
    model.save_pretrained(root / "long")
    tiny_tokenizer().save_pretrained(root / "long")
    return root / "long"


def _args(root, dirs, *extra):
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": {"sk-admin": "*", "sk-a": ["tiny", "a0"], "sk-b": ["tiny", "a1"]}}))
    return [
        "--base",
        str(_long_base(root)),
        "--served-model-name",
        "tiny",
        "--adapter",
        f"a0={dirs['a0']}",
        "--adapter",
        f"a1={dirs['a1']}",
        "--adapter-dir",
        str(root / "adapters"),
        "--max-adapters",
        "3",
        "--max-rank",
        "8",
        "--api-key",
        str(keys),
        *extra,
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    dirs = make_model_dir(root)
    server = Server(
        _args(root, dirs, "--max-batch", "2", "--max-step-tokens", "16", "--max-queue", "4", "--request-timeout", "30"),
        cwd=root,
    )
    yield server, root, dirs
    server.stop()


@pytest.fixture(scope="module")
def http(setup):
    with httpx.Client(base_url=setup[0].url.removesuffix("/v1"), timeout=60) as client:
        yield client


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def test_values_that_would_fail_on_the_engine_are_400_naming_the_field(http):
    for bad, field in (
        ({"temperature": 1e-300}, "temperature"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": ["x" * 300]}, "stop"),
        ({"prompt": ["hi"] * 300}, "prompt"),
        ({"max_tokens": 2**40}, "max_tokens"),
    ):
        response = http.post("/v1/completions", json={"model": "a0", "prompt": "hi", **bad}, headers=ADMIN)
        assert _error(response, 400)["param"] == field, (bad, response.text)
    surrogate = '{"model": "a0", "prompt": "hi \\ud800 there"}'  # valid JSON, not encodable text
    response = http.post("/v1/completions", content=surrogate, headers={**ADMIN, "content-type": "application/json"})
    assert _error(response, 400)["param"] == "prompt" and "surrogate" in response.json()["error"]["message"]
    ok = http.post(
        "/v1/completions",
        json={"model": "a0", "prompt": "hi", "max_tokens": 4, "top_p": 5e-324, "seed": 2**64 - 1},
        headers=ADMIN,
    )
    assert ok.status_code == 200, ok.text  # extreme but valid values serve


def test_framework_errors_come_in_openai_shape(http):
    assert "GET /nope" in _error(http.get("/nope", headers=ADMIN), 404)["message"]
    wrong_method = http.put("/v1/completions", headers=ADMIN)
    _error(wrong_method, 405)
    assert "POST" in wrong_method.headers["allow"]
    not_json = http.post("/v1/completions", content=b"{nope", headers={**ADMIN, "content-type": "application/json"})
    assert "not valid JSON" in _error(not_json, 400)["message"]
    nested = http.post(
        "/v1/completions",
        content=b"[" * 100_000 + b"]" * 100_000,
        headers={**ADMIN, "content-type": "application/json"},
    )
    assert nested.status_code == 400 and _error(nested, 400)
    for source in ("a\x00b", "x" * 5000):
        response = http.post("/v1/adapters", json={"name": "bad", "source": source}, headers=ADMIN)
        assert response.status_code in (400, 422) and _error(response, response.status_code)
    assert http.get("/health").status_code == 200  # and the server is still there


def test_no_key_and_oversized_bodies_are_refused_before_parsing(http):
    invalid = {"model": "a0", "prompt": "hi", "temperature": 7}
    assert _error(http.post("/v1/completions", json=invalid), 401)  # the key first, not the body's fault
    huge = b'{"model": "a0", "prompt": [' + b"1," * (5 * 2**20) + b"1]}"  # 10 MB of token ids
    started = time.monotonic()
    too_big = http.post("/v1/completions", content=huge, headers={**ADMIN, "content-type": "application/json"})
    assert "8388608 bytes" in _error(too_big, 413)["message"] and time.monotonic() - started < 10
    assert http.get("/health").status_code == 200


def test_tenants_see_only_their_own_models_and_no_server_paths(setup, http):
    root = str(setup[1])
    unknown = _error(http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}, headers=A), 404)
    assert "a1" not in unknown["message"] and "a0" not in unknown["message"]
    assert [m["id"] for m in http.get("/v1/models", headers=A).json()["data"]] == ["tiny", "a0"]
    assert [m["id"] for m in http.get("/v1/models", headers=B).json()["data"]] == ["tiny", "a1"]
    listed = http.get("/v1/models", headers=ADMIN).text + http.get("/v1/adapters", headers=ADMIN).text
    assert root not in listed and "/adapters/" not in listed
    digests = {a["id"]: a["digest"] for a in http.get("/v1/adapters", headers=ADMIN).json()["data"]}
    assert len(digests["a0"]) == 64 and digests["a0"] != digests["a1"]
    twin = http.post("/v1/adapters", json={"name": "twin", "source": "a0"}, headers=ADMIN)  # a0's files again
    assert twin.status_code == 201 and twin.json()["digest"] == digests["a0"]
    assert http.delete("/v1/adapters/twin", headers=ADMIN).status_code == 200
    _error(http.get("/metrics"), 401)
    _error(http.get("/metrics", headers=A), 403)
    assert http.get("/metrics", headers=ADMIN).status_code == 200
    _error(http.get("/openapi.json"), 401)
    _error(http.get("/docs"), 401)
    assert http.get("/openapi.json", headers=B).json()["paths"]


def test_a_burst_gets_429_with_retry_after_while_another_key_gets_in(http):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        burst = [pool.submit(http.post, "/v1/completions", json=body, headers=A) for _ in range(12)]
        time.sleep(0.3)  # A's burst is queued
        other = pool.submit(http.post, "/v1/completions", json={**body, "max_tokens": 4}, headers=B)
        answers = [f.result() for f in burst]
        assert other.result().status_code == 200, other.result().text
    refused = [r for r in answers if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429, 504) for r in answers)  # 504: a slow machine's deadline
    for response in refused:
        assert _error(response, 429)["type"] == "rate_limit_exceeded"
        assert 1 <= int(response.headers["retry-after"]) <= 60


def _generated(http) -> float:
    return metric(http.get("/metrics", headers=ADMIN).text, "adapterhub_generated_tokens_total")


def _idle(http, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        health = http.get("/health").json()
        if not health["running_rows"] and not health["queue_depth"]:
            return True
        time.sleep(0.1)
    return False


def _stopped_early(http, before: float, max_tokens: int, why: str) -> None:
    """Asserts a request that, left running (ignore_eos), would generate all of its `max_tokens`
    stopped short of them (counted since the metric read `before`): judged by tokens, not by a time
    bound, so neither a slow machine nor a fast one decides it. No token comes after it stopped."""
    since = time.monotonic()
    assert _idle(http, 120), "the request neither stopped nor finished within 120 s"
    generated = _generated(http) - before
    assert generated < max_tokens, (
        f"{generated} of {max_tokens} tokens were generated, idle {time.monotonic() - since:.1f} s after {why}"
    )
    time.sleep(0.5)
    assert _generated(http) - before == generated


def test_a_whole_response_stops_generating_when_its_client_disconnects(http):
    assert _idle(http)
    before = _generated(http)
    body = {"model": "a0", "prompt": "hi", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(http.base_url.join("/v1/completions"), json=body, headers=ADMIN, timeout=1.0)
    _stopped_early(http, before, body["max_tokens"], "its client went away")


def test_a_request_past_the_deadline_gets_504(tmp_path):
    dirs = make_model_dir(tmp_path)
    server = Server(_args(tmp_path, dirs, "--request-timeout", "1"), cwd=tmp_path)
    with httpx.Client(base_url=server.url.removesuffix("/v1"), timeout=60) as http:
        try:
            _deadline(http)
        finally:
            server.stop()


def _deadline(http) -> None:
    body = {"model": "a0", "prompt": "hi", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    started, before = time.monotonic(), _generated(http)
    response = http.post("/v1/completions", json=body, headers=ADMIN)
    assert _error(response, 504)["type"] == "timeout" and 1 <= time.monotonic() - started < 30
    _stopped_early(http, before, body["max_tokens"], "its 504")
    streamed = http.post("/v1/completions", json={**body, "stream": True}, headers=ADMIN)  # the error is the last event
    events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2].removeprefix("data: "))["error"]["code"] == 504


def test_sigterm_past_the_drain_timeout_answers_503(tmp_path):
    dirs = make_model_dir(tmp_path)
    server = Server(_args(tmp_path, dirs, "--drain-timeout", "1"), cwd=tmp_path)
    try:
        body = {"model": "a0", "prompt": "hi", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            whole = pool.submit(httpx.post, server.url + "/completions", json=body, headers=ADMIN, timeout=60)
            streamed = pool.submit(
                httpx.post, server.url + "/completions", json={**body, "stream": True}, headers=ADMIN, timeout=60
            )
            time.sleep(1.0)
            server.process.send_signal(signal.SIGTERM)
            assert _error(whole.result(), 503)["message"].startswith("the server stopped")
            events = [line for line in streamed.result().text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2].removeprefix("data: "))["error"]["code"] == 503
        assert server.process.wait(60) in (0, -signal.SIGTERM)
    finally:
        server.stop()


def test_sigterm_drains_the_requests_in_flight_then_exits(tmp_path):
    dirs = make_model_dir(tmp_path)
    server = Server(_args(tmp_path, dirs, "--drain-timeout", "60"), cwd=tmp_path)
    try:
        body = {"model": "a0", "prompt": "hi", "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/completions", json=body, headers=ADMIN, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            server.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn exits by the signal it drained for
    finally:
        server.stop()
