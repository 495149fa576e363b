"""vLLM's and LoRAX's endpoints beside ours (serve/vllm_api.py): GET /v1/models/{model}, vLLM's
load/unload_lora_adapter (a load -> generate -> replace -> unload cycle with the openai client),
/tokenize, /detokenize and /tokenizer_info (lm-evaluation-harness's remote tokenizer built from them
encodes and decodes as the server's tokenizer does), with keys: a model the key may not use answers as
one that does not exist. LoRAX's adapter_id loads an adapter just in time, once for concurrent requests.
The HTTP tests run against `adapterhub serve` as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import pathlib

import httpx
import openai
import pytest
from serving import Offline, Server, keys_file, make_model_dir, served_llama
from starlette.requests import Request
from tiny_models import tiny_tokenizer

from adapterhub import Backbone
from adapterhub.serve.access import Access
from adapterhub.serve.app import create_app
from adapterhub.serve.backend import LocalBackend
from adapterhub.serve.engine import Engine
from adapterhub.serve.errors import ApiError
from adapterhub.serve.tenancy import Keys, Sources
from adapterhub.serve.vllm_api import lorax_model

ADMIN = {"Authorization": "Bearer sk-admin"}
TENANT = {"Authorization": "Bearer sk-tenant"}  # may use a0 and tiny (serving.keys_file)
PROMPT = "hello there"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_api")
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
            f"org/a2={dirs['a2']}",
            "--adapter-dir",
            str(root / "adapters"),
            "--max-adapters",
            "3",
            "--max-rank",
            "8",
            "--api-key",
            str(keys_file(root / "keys.json")),
        ],
        cwd=root,
    )
    yield server, Offline(dirs), dirs, root
    server.stop()


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup[0].url, api_key="sk-admin", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(setup):
    with httpx.Client(base_url=setup[0].url.removesuffix("/v1"), headers=ADMIN, timeout=60) as c:
        yield c


def _complete(client, model: str, max_tokens: int = 16, **kw):
    answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, **kw)
    return answer.choices[0].text


def _unnamed(response: httpx.Response, name: str) -> tuple[int, str]:
    """The status and body with the name asked for taken out: what a client can tell two answers apart by."""
    return response.status_code, response.text.replace(name, "NAME")


def test_one_model_is_its_listing_entry_and_others_are_not_found(setup, client, http):
    listed = {m.id: m.model_dump(exclude={"created"}) for m in client.models.list().data}
    for name in ("tiny", "a0", "org/a2"):  # a name with '/' too
        assert client.models.retrieve(name).model_dump(exclude={"created"}) == listed[name]
    assert listed["a0"]["parent"] == "tiny" and listed["tiny"]["parent"] is None
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    url = setup[0].url
    with httpx.Client(base_url=url, headers=TENANT) as tenant:
        assert tenant.get("/models/a0").json()["id"] == "a0"
        # another tenant's model answers exactly as a model that does not exist
        assert _unnamed(tenant.get("/models/a1"), "a1") == _unnamed(tenant.get("/models/a9"), "a9")
    assert httpx.get(url + "/models/a0").status_code == 401


def test_vllm_load_generate_replace_unload(setup, client, http):
    offline = setup[1]
    loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "v1.5", "lora_path": "a3"})
    assert loaded.status_code == 200 and loaded.headers["content-type"].startswith("text/plain")
    assert loaded.text == "Success: LoRA adapter 'v1.5' added successfully."
    assert client.models.retrieve("v1.5").parent == "tiny"  # a name with '.'
    assert _complete(client, "v1.5") == offline.complete("a3", PROMPT, 16)

    again = http.post("/v1/load_lora_adapter", json={"lora_name": "v1.5", "lora_path": "a2"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    assert "has already been loaded" in again.json()["error"]["message"] and "load_inplace" in again.text

    # replaced in place while a request streams: it finishes on the weights it started with
    stream = iter(
        client.completions.create(
            model="v1.5", prompt=PROMPT, max_tokens=40, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    first = next(stream).choices[0].text
    replaced = http.post("/v1/load_lora_adapter", json={"lora_name": "v1.5", "lora_path": "a2", "load_inplace": True})
    assert replaced.status_code == 200, replaced.text
    assert first + "".join(c.choices[0].text for c in stream) == offline.complete("a3", PROMPT, 40, ignore_eos=True)
    assert _complete(client, "v1.5") == offline.complete("a2", PROMPT, 16)

    unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "v1.5", "lora_int_id": 7})
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'v1.5' removed successfully."
    with pytest.raises(openai.NotFoundError):
        _complete(client, "v1.5")
    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "v1.5"})
    assert gone.status_code == 404
    assert gone.json()["error"] == {
        "message": "The lora adapter 'v1.5' cannot be found.",
        "type": "not_found_error",
        "param": "lora_name",
        "code": 404,
    }


def test_vllm_adapter_errors(setup, http):
    def load(body, headers=ADMIN):
        return http.post("/v1/load_lora_adapter", json=body, headers=headers)

    for body, status, param in (
        ({"lora_name": "x", "lora_path": "broken"}, 422, "lora_path"),  # a wrongly shaped tensor
        ({"lora_name": "x", "lora_path": "../base"}, 422, "lora_path"),  # outside --adapter-dir
        ({"lora_name": "x", "lora_path": "missing"}, 422, "lora_path"),
        ({"lora_name": "tiny", "lora_path": "a3"}, 400, "lora_name"),  # the base model's name
        ({"lora_name": "a/b", "lora_path": "a3"}, 400, "lora_name"),
        ({"lora_name": "x", "lora_path": "a3", "load_inplace": "yes"}, 400, "load_inplace"),
        ({"lora_name": "x", "lora_path": "a3", "is_3d_lora_weight": False}, 400, "is_3d_lora_weight"),
        ({"lora_name": "x"}, 400, "lora_path"),
    ):
        response = load(body)
        assert (response.status_code, response.json()["error"]["param"]) == (status, param), (body, response.text)
    assert load({"lora_name": "x", "lora_path": "a3"}, TENANT).status_code == 403  # loading is the admin's
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a0"}, headers=TENANT).status_code == 403
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": ""}).status_code == 400
    assert "x" not in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_tokenize_and_detokenize(setup, client, http):
    tokenizer = tiny_tokenizer()
    ids = tokenizer(PROMPT)["input_ids"]
    answer = http.post("/tokenize", json={"model": "a0", "prompt": PROMPT})
    assert answer.json() == {"count": len(ids), "max_model_len": 64, "tokens": ids, "token_strs": None}
    strings = http.post("/tokenize", json={"prompt": "ab", "add_special_tokens": False, "return_token_strs": True})
    assert strings.json()["token_strs"] == ["a", "b"]

    # messages: the prompt /v1/chat/completions runs
    messages = [{"role": "user", "content": "hi there"}]
    chat = http.post("/tokenize", json={"model": "org/a2", "messages": messages}).json()
    usage = client.chat.completions.create(model="org/a2", messages=messages, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    assert tokenizer.decode(chat["tokens"]).endswith("assistant: ")
    partial = [*messages, {"role": "assistant", "content": "Hel"}]
    body = {"messages": partial, "add_generation_prompt": False, "continue_final_message": True}
    assert tokenizer.decode(http.post("/tokenize", json=body).json()["tokens"]).endswith("assistant: Hel")
    for bad in (
        {"prompt": "a", "messages": messages},
        {"model": "a0"},
        {"prompt": "a", "add_generation_prompt": True},
        {"messages": partial, "continue_final_message": True},  # add_generation_prompt defaults to true
        {"prompt": "a", "chat_template": "{{ 1 }}"},
        {"prompt": 5},
    ):
        assert http.post("/tokenize", json=bad).status_code == 400, bad

    assert http.post("/detokenize", json={"model": "a0", "tokens": ids}).json() == {"prompt": PROMPT}
    assert http.post("/detokenize", json={"tokens": [1, 40]}).json() == {"prompt": "<eos>E"}  # special tokens kept
    outside = http.post("/detokenize", json={"tokens": [40, len(tokenizer)]})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "tokens"
    assert f"tokens[1] = {len(tokenizer)}" in outside.json()["error"]["message"]
    assert http.post("/detokenize", json={"tokens": [-1]}).status_code == 400

    url = setup[0].url.removesuffix("/v1")
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [40]})):
        assert httpx.post(url + path, json=body).status_code == 401
        assert httpx.post(url + path, json=body, headers=TENANT).status_code == 200  # no model: any known key
        for model in ("a1", "a9"):
            assert http.post(path, json={"model": model, **body}).status_code == (200 if model == "a1" else 404)
        # another tenant's model answers exactly as a model that does not exist
        forbidden = httpx.post(url + path, json={"model": "a1", **body}, headers=TENANT)
        unknown = httpx.post(url + path, json={"model": "a9", **body}, headers=TENANT)
        assert _unnamed(forbidden, "a1") == _unnamed(unknown, "a9")


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(setup, monkeypatch):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    server, offline, _, root = setup
    url = server.url.removesuffix("/v1")
    info = httpx.get(url + "/tokenizer_info", headers=TENANT).json()
    assert info["eos_token"] == "<eos>" and info["pad_token"] == "<pad>" and info["bos_token"] is None
    assert info["tokenizer_class"] and info["chat_template"] == tiny_tokenizer().chat_template
    assert str(root) not in str(info) and "name_or_path" not in info  # no server paths
    assert httpx.get(url + "/tokenizer_info").status_code == 401

    base_url = server.url + "/completions"  # what lm-eval is given; it finds the tokenizer routes beside /v1
    assert check_remote_tokenizer_support(base_url, auth_token="sk-tenant")
    remote, tokenizer = RemoteTokenizer(base_url, auth_token="sk-tenant"), tiny_tokenizer()
    for text in (PROMPT, "The quick <eos> fox", ""):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert remote.encode(text) == ids and remote.decode(ids) == tokenizer.decode(ids)
    assert (remote.eos_token_id, remote.bos_token_id) == (1, None)
    messages = [{"role": "user", "content": "hi"}]
    assert remote.apply_chat_template(messages) == tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )

    # `lm_eval --model local-completions --model_args base_url=...,model=a0`: the remote tokenizer on its own
    monkeypatch.setenv("OPENAI_API_KEY", "sk-tenant")
    lm = LocalCompletionsAPI(base_url=base_url, model="a0", auth_token="sk-tenant", max_gen_toks=12)
    assert lm.tokenizer_backend == "remote"
    request = Instance("generate_until", {}, (PROMPT, {"until": ["\n"], "max_gen_toks": 12}), 0)
    assert lm.generate_until([request], disable_tqdm=True) == [offline.complete("a0", PROMPT, 12)]


# ---- LoRAX's adapter_id, in process -------------------------------------------------------------


def _request(key: str) -> Request:
    return Request({"type": "http", "headers": [(b"authorization", f"Bearer {key}".encode())]})


def test_lorax_adapter_loads_just_in_time_once(setup):
    root = setup[3]
    engine = Engine(Backbone(served_llama(), max_adapters=4, max_rank=8), tiny_tokenizer(), base_name="tiny")
    backend = LocalBackend(engine)
    access = Access(Keys({"sk-admin": "*", "sk-tenant": frozenset({"tiny", "a0", "a3"})}))
    sources = Sources(root / "adapters")
    loads: list[str] = []
    add = backend.add_adapter

    async def counted(name, *args):
        loads.append(name)
        return await add(name, *args)

    backend.add_adapter = counted

    async def model(adapter_id: str, adapter_source: str | None = "local", key: str = "sk-tenant") -> str:
        return await lorax_model(backend, access, sources, _request(key), adapter_id, adapter_source)

    async def scenario():
        assert await asyncio.gather(*(model("a3") for _ in range(6))) == ["a3"] * 6
        assert loads == ["a3"]  # six requests, one load
        assert await model("a3", None) == "a3" and await model("tiny") == "tiny"  # loaded, or the base: as is
        assert loads == ["a3"]
        listed = {a["id"]: a for a in await backend.adapters()}
        assert listed["a3"]["source"] == "a3" and listed["a3"]["resident"]

        async def refused(adapter_id: str, adapter_source: str | None = "local", key: str = "sk-tenant"):
            with pytest.raises(ApiError) as error:
                await model(adapter_id, adapter_source, key)
            return error.value.status, error.value.param

        assert await refused("a3", "s3") == (400, "adapter_source")
        assert await refused("a0", "pbase") == (400, "adapter_source")
        assert await refused("a2") == (404, "model")  # a name the tenant may not use: never loaded for it
        assert await refused("a2", key="sk-wrong") == (401, None)
        assert await refused("missing", key="sk-admin") == (422, "adapter_id")
        assert await refused("broken", key="sk-admin") == (422, "adapter_id")
        assert await refused("a2", "hub", key="sk-admin") == (422, "adapter_source")  # a directory, not a repo
        assert await refused("a#1", key="sk-admin") == (400, "adapter_id")
        assert loads == ["a3", "broken"]  # "missing" is refused before any load
        assert await model("a2", key="sk-admin") == "a2"  # the admin may load any name

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()


def test_ray_ingress_takes_the_tokenizer_from_a_replica():
    """Under Ray the ingress has no engine: the tokenizer routes ask a replica for its tokenizer once."""
    ray_app = pytest.importorskip("adapterhub.serve.ray_app", reason="the ray extra is not installed")
    from fastapi.testclient import TestClient

    asked = []

    class Method:
        def __init__(self, fails: bool):
            self.fails = fails

        async def remote(self):
            asked.append(1)
            if self.fails:
                raise ConnectionError("no replica")
            return tiny_tokenizer(), 64

    class Replicas:
        tokenizer = Method(fails=False)

    class Failing:
        tokenizer = Method(fails=True)

    with TestClient(create_app(ray_app.RayBackend(Replicas(), "tiny", {}))) as local:
        for _ in range(2):
            tokens = local.post("/tokenize", json={"model": "tiny", "prompt": "ab"}).json()["tokens"]
            assert tokens == tiny_tokenizer()("ab")["input_ids"]
        assert local.get("/tokenizer_info").json()["eos_token"] == "<eos>"
    assert len(asked) == 1
    with TestClient(create_app(ray_app.RayBackend(Failing(), "tiny", {}))) as failing:
        answer = failing.post("/detokenize", json={"tokens": [65]})
        assert answer.status_code == 503 and "ConnectionError" in answer.json()["error"]["message"]


def test_lorax_fields_on_the_completion_routes(setup, client, http):
    """LoRAX's clients name the adapter per request: adapter_id (+ adapter_source) instead of model."""
    offline = setup[1]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    answer = http.post("/v1/completions", json={**body, "adapter_id": "a3", "adapter_source": "local"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "a3"
    assert answer.json()["choices"][0]["text"] == offline.complete("a3", PROMPT, 12)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "adapter_id": "a3"}
    assert http.post("/v1/chat/completions", json={**chat, "adapter_source": "local"}).status_code == 200
    refused = http.post("/v1/completions", json={**body, "adapter_id": "a3", "adapter_source": "s3"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "adapter_source"
    tenant = http.post("/v1/completions", json={**body, "adapter_id": "a3"}, headers=TENANT)
    assert tenant.status_code == 404  # a key that may not use the name cannot load it either
    for missing in ("missing", "broken"):  # any key allowed a name may cause its load: no server path in the answer
        failed = http.post("/v1/completions", json={**body, "adapter_id": missing, "adapter_source": "local"})
        assert failed.status_code == 422 and str(setup[3]) not in failed.text, failed.text
        assert "/tmp" not in failed.text, failed.text


def test_unrooted_messages_hide_relative_and_real_adapter_dirs(tmp_path, monkeypatch):
    """Errors a tenant may cause name no server path, whatever form --adapter-dir was given in."""
    from adapterhub.serve.vllm_api import _unrooted

    (tmp_path / "adapters").mkdir()
    monkeypatch.chdir(tmp_path)
    for given in (".", "adapters", str(tmp_path / "adapters")):
        sources = Sources(pathlib.Path(given))
        root = os.path.realpath(given)
        message = _unrooted(ValueError(f"no directory named 'x.y' under {root} (see {root}/x.y/config.json)"), sources)
        assert str(tmp_path) not in message and "'x.y'" in message and "config.json" in message, message
