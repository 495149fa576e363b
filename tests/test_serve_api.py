"""`adapterhub serve` as a real subprocess on a loopback port, driven by the official openai client
and by httpx: answers equal what Backbone gives offline, the OpenAI API's parameters and errors,
adapters loaded, replaced and deleted while requests run, keys. Each test runs against the server
alone and against `adapterhub serve --ray` (two Ray Serve replicas): a client cannot tell them apart."""

from __future__ import annotations

import concurrent.futures
import pathlib

import httpx
import openai
import pytest
from serving import Offline, Server, keys_file, make_model_dir, metric, served_llama

ADMIN = {"Authorization": "Bearer sk-admin"}
PROMPTS = ["hello there", "The quick brown fox", "abc", "zebra crossing"]


RAY = ["--ray", "--replicas", "2"]


@pytest.fixture(
    scope="module", params=[pytest.param([], id="local"), pytest.param(RAY, id="ray", marks=pytest.mark.ray)]
)
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    dirs = make_model_dir(root)
    server = Server(
        [
            "--base",
            str(root / "base"),
            "--served-model-name",
            "tiny",
            "--adapter",
            f"a0={dirs['a0']}",
            "--adapter",
            f"a1={dirs['a1']}",
            "--adapter",
            f"a2={dirs['a2']}",
            "--adapter-dir",
            str(root / "adapters"),
            "--max-adapters",
            "3",
            "--max-rank",
            "8",
            "--api-key",
            str(keys_file(root / "keys.json")),
            *request.param,
        ],
        cwd=root,
    )
    yield server, Offline(dirs), dirs
    server.stop()


def local(setup) -> bool:
    """The engine's own metrics are at /metrics without Ray (with Ray, each replica has its own)."""
    return "--ray" not in setup[0].args


@pytest.fixture(scope="module")
def client(setup):
    server = setup[0]
    return openai.OpenAI(base_url=server.url, api_key="sk-admin", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(setup):
    with httpx.Client(base_url=setup[0].url.removesuffix("/v1"), headers=ADMIN, timeout=120) as c:
        yield c


def _complete(client, model, prompt, max_tokens=24, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def test_mixed_batch_equals_offline_backbone(setup, client, http):
    _, offline, _ = setup
    before = http.get("/metrics").text
    names = ["a0", "a1", "a2", "tiny"] * 2
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        futures = [
            pool.submit(_complete, client, n, PROMPTS[i % 4], 30, extra_body={"ignore_eos": True})
            for i, n in enumerate(names)
        ]
        answers = [f.result() for f in futures]
    for i, (name, answer) in enumerate(zip(names, answers)):
        adapter = None if name == "tiny" else name
        assert answer.choices[0].text == offline.complete(adapter, PROMPTS[i % 4], 30, ignore_eos=True), name
        assert answer.usage.completion_tokens == 30 and answer.choices[0].finish_reason == "length"
        assert answer.usage.prompt_tokens == len(offline.ids(PROMPTS[i % 4]))
    after = http.get("/metrics").text
    if not local(setup):
        return
    steps = metric(after, "adapterhub_batch_rows_count") - metric(before, "adapterhub_batch_rows_count")
    rows = metric(after, "adapterhub_batch_rows_sum") - metric(before, "adapterhub_batch_rows_sum")
    assert rows / steps > 2, "requests for different adapters should share decode steps"
    # without ignore_eos the answers stop where the offline generation stops
    for name in ("a0", "a2"):
        assert _complete(client, name, "stop?", 40).choices[0].text == offline.complete(name, "stop?", 40)


def test_chat_uses_the_chat_template(setup, client):
    offline = setup[1]
    answer = client.chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "hi there"}], max_tokens=20, temperature=0
    )
    assert answer.choices[0].message.content == offline.chat("a1", "hi there", 20)
    assert answer.choices[0].message.role == "assistant" and answer.object == "chat.completion"


def test_streaming_equals_not_streaming(client):
    whole = _complete(client, "a0", PROMPTS[1], 25)
    chunks = list(_complete(client, "a0", PROMPTS[1], 25, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="a2", messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model="a2", messages=messages, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content


def test_sampling_parameters(setup, client):
    offline = setup[1]
    greedy = offline.complete("a0", PROMPTS[0], 30, ignore_eos=True)
    assert len(greedy) >= 8
    stop = greedy[5:7]
    cut = _complete(client, "a0", PROMPTS[0], 30, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"
    nucleus = client.completions.create(
        model="a0", prompt=PROMPTS[0], max_tokens=30, temperature=1.0, top_p=1e-6, extra_body={"ignore_eos": True}
    )
    assert nucleus.choices[0].text == greedy  # top_p that keeps only the likeliest token is greedy

    def sample(seed):
        return client.completions.create(
            model="a1",
            prompt=PROMPTS[2],
            max_tokens=20,
            temperature=1.0,
            seed=seed,
            n=3,
            extra_body={"ignore_eos": True},
        )

    first, again, other = sample(7), sample(7), sample(8)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and first.usage.completion_tokens == 60
    assert texts == [c.text for c in again.choices] and texts != [c.text for c in other.choices]
    assert len(set(texts)) > 1  # each choice samples on its own
    two = client.completions.create(model="tiny", prompt=["ab", "cd"], max_tokens=5, temperature=0, n=2)
    assert [c.text for c in two.choices][::2] == [offline.complete(None, p, 5) for p in ("ab", "cd")]


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and {"a0", "a1", "a2"} <= set(ids)


def test_errors(setup, http):
    def post(body, path="/v1/completions"):
        return http.post(path, json=body)

    unknown = post({"model": "nope", "prompt": "hi"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]
    for bad in (
        {"temperature": 3},
        {"n": 0},
        {"top_p": 0},
        {"max_tokens": -1},
        {"stop": [""]},
        {"presence_penalty": 2.5},
        {"logprobs": 21},
        {"logit_bias": {"x": 1}},
        {"suffix": "end"},
        {"best_of": 1, "n": 2},
        {"guided_regex": "a+", "guided_choice": ["a"]},
        {"guided_regex": "a("},
        {"response_format": {"type": "json_schema"}},
        {"bogus": 1},
        {"prompt": []},
    ):
        response = post({"model": "a0", "prompt": "hi", **bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    outside = post({"model": "a0", "prompt": [5, 6, 100000]})
    assert outside.status_code == 400 and "vocabulary" in outside.json()["error"]["message"]
    too_long = post({"model": "a0", "prompt": "x" * 60, "max_tokens": 10})
    assert too_long.status_code == 400 and "context of 64" in too_long.json()["error"]["message"]
    too_long = post({"model": "a0", "messages": [{"role": "user", "content": "y" * 80}]}, "/v1/chat/completions")
    assert too_long.status_code == 400


def test_bad_adapter_upload_leaves_the_others_serving(setup, client, http):
    offline = setup[1]
    for source, words in (("broken", "q_proj"), ("missing", "--adapter-dir"), ("../base", "outside")):
        response = http.post("/v1/adapters", json={"name": "bad", "source": source})
        assert response.status_code == 422, response.text
        assert words in response.json()["error"]["message"]
    assert "bad" not in [m.id for m in client.models.list().data]
    assert _complete(client, "a1", PROMPTS[0]).choices[0].text == offline.complete("a1", PROMPTS[0], 24)


def test_load_replace_and_delete_while_requests_run(setup, client, http):
    offline = setup[1]
    jobs = [("a0", PROMPTS[i % 4]) if i % 2 else ("a1", PROMPTS[i % 4]) for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        running = [
            pool.submit(_complete, client, name, prompt, 40, extra_body={"ignore_eos": True}) for name, prompt in jobs
        ]
        loaded = http.post("/v1/adapters", json={"name": "a3", "source": "a3"})  # slots full: evicts one
        assert loaded.status_code == 201, loaded.text
        replaced = http.post("/v1/adapters", json={"name": "a0", "source": "a3"})  # a0 now has a3's weights
        assert replaced.status_code == 201, replaced.text
        deleted = pool.submit(http.delete, "/v1/adapters/a1")  # waits for a1's requests
        answers = [f.result() for f in running]
        assert deleted.result().status_code == 200
    for (name, prompt), answer in zip(jobs, answers):  # each on the weights it started with, none torn
        assert answer.choices[0].text == offline.complete(name, prompt, 40, ignore_eos=True)
    assert _complete(client, "a0", PROMPTS[0]).choices[0].text == offline.complete("a3", PROMPTS[0], 24)
    assert _complete(client, "a3", PROMPTS[1]).choices[0].text == offline.complete("a3", PROMPTS[1], 24)
    with pytest.raises(openai.NotFoundError):
        _complete(client, "a1", PROMPTS[0])
    # a2 was evicted to make room; asked again it comes back from the host cache
    assert _complete(client, "a2", PROMPTS[2]).choices[0].text == offline.complete("a2", PROMPTS[2], 24)
    text = http.get("/metrics").text
    if not local(setup):
        return
    assert metric(text, "adapterhub_adapter_evictions_total") >= 1
    assert metric(text, "adapterhub_adapter_loads_total", result="ok") >= 6
    assert metric(text, "adapterhub_adapter_slots") == 3


def test_keys(setup):
    url = setup[0].url
    for key, status in (("wrong", 401), ("", 401)):
        with pytest.raises(openai.APIStatusError) as error:
            _complete(openai.OpenAI(base_url=url, api_key=key or "x", max_retries=0), "a0", "hi")
        assert error.value.status_code == status
    tenant = openai.OpenAI(base_url=url, api_key="sk-tenant", max_retries=0)
    assert _complete(tenant, "tiny", "hi", 3).choices
    with pytest.raises(openai.NotFoundError):  # another tenant's model: as if it did not exist
        _complete(tenant, "a2", "hi")
    assert [m.id for m in tenant.models.list().data] == ["tiny", "a0"]
    denied = httpx.post(
        url + "/adapters", json={"name": "x", "source": "a3"}, headers={"Authorization": "Bearer sk-tenant"}
    )
    assert denied.status_code == 403


def test_metrics_and_health(setup, http):
    assert http.get("/health").json()["status"] == "ok"
    text = http.get("/metrics").text
    assert "adapterhub_requests_total" in text
    if not local(setup):
        return
    for name in (
        "adapterhub_requests_total",
        "adapterhub_generated_tokens_total",
        "adapterhub_tokens_per_second",
        "adapterhub_queue_depth",
        "adapterhub_batch_rows_bucket",
        "adapterhub_adapter_slots_used",
        "adapterhub_adapter_loads_total",
        "adapterhub_adapter_evictions_total",
        "adapterhub_adapter_load_seconds_bucket",
    ):
        assert name in text, name
    assert metric(text, "adapterhub_generated_tokens_total") > 0


def test_cli_refuses_a_bad_start(tmp_path: pathlib.Path):
    with pytest.raises(RuntimeError, match="expected NAME=SOURCE"):
        Server(["--base", "unused", "--adapter", "justaname"], cwd=tmp_path, timeout=60)
    with pytest.raises(RuntimeError, match=r"--api-key: .*missing-keys\.json: no such file"):
        Server(["--base", "unused", "--api-key", "missing-keys.json"], cwd=tmp_path, timeout=60)
    with pytest.raises(RuntimeError, match=r"--api-key: .*empty"):
        Server(["--base", "unused", "--api-key", " "], cwd=tmp_path, timeout=60)
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (tmp_path / "secret").write_text("{}")
    (leaky / "adapter_config.json").symlink_to(tmp_path / "secret")
    with pytest.raises(RuntimeError, match=r"--adapter leaky=.*outside"):
        Server(["--base", "unused", "--adapter", f"leaky={leaky}"], cwd=tmp_path, timeout=60)
    served_llama().save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(RuntimeError, match=r"no tokenizer could be loaded from it.*tokenizer\.save_pretrained"):
        Server(["--base", str(tmp_path / "no-tokenizer")], cwd=tmp_path, timeout=60)
