"""Compositions served: rows of compositions, single adapters and the base in one continuous batch give
what each gives alone; materializations are pinned while used and counted; over HTTP the `composition`
field, LoRAX's `merged_adapters` and registered compositions (POST /v1/compositions) work with the openai
client, keys apply to every input, and bad compositions are 400s naming the field."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from serving import Offline, Server, keys_file, make_model_dir, metric, served_llama
from test_serve_engine import _run
from tiny_models import tiny_tokenizer

from adapterhub import Backbone, Composition
from adapterhub.serve.engine import Engine, Failed
from adapterhub.serve.errors import RequestError, UnknownAdapter
from adapterhub.serve.sampling import Sampling

ADMIN = {"Authorization": "Bearer sk-admin"}
TENANT = {"Authorization": "Bearer sk-tenant"}  # may use a0 and tiny (serving.keys_file)
CAT = {"adapters": [{"name": "a0", "weight": 0.8}, {"name": "a2", "weight": 0.5}], "method": "cat"}
TIES = {"adapters": [{"name": "a0", "weight": 0.6}, {"name": "a3", "weight": 0.7}], "method": "ties", "density": 0.5}
IA3 = {"adapters": [{"name": "a1", "weight": 0.5}, {"name": "a1b", "weight": 0.5}]}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("compositions"))


def test_mixed_batch_equals_each_row_alone(dirs):
    offline = Offline(dirs)
    backbone = Backbone(served_llama(), max_adapters=4, max_rank=8)
    engine = Engine(backbone, tiny_tokenizer(), base_name="tiny", max_batch=8).start()
    try:
        for name in ("a0", "a2", "a3"):
            engine.add_adapter(name, str(dirs[name]))
        rows = [Composition.parse(CAT), "a0", None, Composition.parse(TIES)]
        jobs = [(row, prompt) for prompt in ("hello", "xyz") for row in rows]
        texts = _run(engine, jobs, Sampling(max_tokens=10, temperature=0, ignore_eos=True))
        assert texts == [offline.complete(row, p, 10, ignore_eos=True) for row, p in jobs]
        assert len(set(texts[:4])) == 4, "each row must differ from the others"
        assert len(backbone.names) == 4  # a0, a2, a3 and one materialization of TIES; "cat" merges nothing
        assert not any(backbone.info(n).pinned for n in backbone.names)  # let go once the requests ended
        assert engine.metrics.compositions.labels(method="cat")._value.get() == 2
    finally:
        engine.stop()


def test_engine_refuses_what_cannot_compose(dirs):
    engine = Engine(Backbone(served_llama(), max_adapters=4, max_rank=8), tiny_tokenizer(), base_name="tiny").start()
    try:
        engine.add_adapter("a0", str(dirs["a0"]))
        engine.add_adapter("a1", str(dirs["a1"]))
        sampling = Sampling(max_tokens=2)
        with pytest.raises(UnknownAdapter, match="'nope'"):
            engine.submit(Composition.parse({"adapters": ["a0", "nope"]}), [5], sampling, lambda e: None)
        with pytest.raises(RequestError, match="mixes adapter types"):
            engine.submit(Composition.parse({"adapters": ["a0", "a1"]}), [5], sampling, lambda e: None)
        with pytest.raises(RequestError, match="compose by"):
            engine.submit(Composition.parse({"adapters": ["a1"], "method": "svd"}), [5], sampling, lambda e: None)
        assert engine.queue_depth() == 0 and not engine._users  # nothing counted for refused requests
    finally:
        engine.stop()


def test_evicted_inputs_reload_for_a_composition(dirs):
    """Two slots: a composition of two inputs plus its materialization cannot all stay; the inputs come
    back and the request still runs (the materialization is made once they are pinned)."""
    offline = Offline(dirs)
    backbone = Backbone(served_llama(), max_adapters=3, max_rank=8)
    engine = Engine(backbone, tiny_tokenizer(), base_name="tiny", max_batch=4).start()
    try:
        for name in ("a0", "a2", "a3"):
            engine.add_adapter(name, str(dirs[name]))
        jobs = [("a2", "hello"), (Composition.parse(TIES), "hello"), ("a2", "abc")]
        texts = _run(engine, jobs, Sampling(max_tokens=6, temperature=0, ignore_eos=True))
        assert texts == [offline.complete(r, p, 6, ignore_eos=True) for r, p in jobs]
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("compositions_http")
    dirs = make_model_dir(root)
    args = ["--base", str(root / "base"), "--served-model-name", "tiny", "--max-adapters", "6", "--max-rank", "8"]
    for name in ("a0", "a1", "a2", "a3"):
        args += ["--adapter", f"{name}={dirs[name]}"]
    args += ["--adapter-dir", str(root / "adapters"), "--api-key", str(keys_file(root / "keys.json"))]
    served = Server(args, cwd=root)
    yield served, Offline(dirs)
    served.stop()


def test_openai_client_with_compositions(server):
    served, offline = server
    client = openai.OpenAI(base_url=served.url, api_key="sk-admin", max_retries=0)
    prompt, n = "hello there", 8

    def complete(**body):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, extra_body=body)

    want_cat = offline.complete(CAT, prompt, n)
    assert complete(composition=CAT).choices[0].text == want_cat
    merged = {"ids": ["a0", "a3"], "weights": [0.6, 0.7], "merge_strategy": "ties", "density": 0.5}
    assert complete(merged_adapters=merged).choices[0].text == offline.complete(TIES, prompt, n)

    created = httpx.post(served.url + "/compositions", json={"name": "blend", **CAT}, headers=ADMIN, timeout=30)
    assert created.status_code == 201, created.text
    assert created.json()["method"] == "cat"
    ids = [m.id for m in client.models.list().data]
    assert "blend" in ids
    chat = client.chat.completions.create(
        model="blend", messages=[{"role": "user", "content": "hi"}], max_tokens=n, temperature=0
    )
    assert chat.choices[0].message.content == offline.chat(CAT, "hi", n)

    metrics = httpx.get(served.url.removesuffix("/v1") + "/metrics", headers=ADMIN, timeout=30).text
    assert metric(metrics, "adapterhub_compositions_total", method="cat") >= 2
    assert metric(metrics, "adapterhub_composition_materializations_total") == 1  # the TIES one

    deleted = httpx.delete(served.url + "/compositions/blend", headers=ADMIN, timeout=30)
    assert deleted.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="blend", prompt=prompt, max_tokens=2)


def test_http_refusals_and_keys(server):
    served, _ = server
    url = served.url.removesuffix("/v1")

    def post(body, headers=ADMIN, path="/v1/completions"):
        return httpx.post(
            url + path, json={"model": "tiny", "prompt": "hi", "max_tokens": 2, **body}, headers=headers, timeout=30
        )

    cases = {
        "composition.adapters": {"composition": {"adapters": []}},
        "composition.density": {"composition": {"adapters": [{"name": "a0"}], "density": 2}},
        "composition.adapters.0": {"composition": {"adapters": ["a0"]}},
        "model": {"model": "a0", "composition": CAT},
        "merged_adapters": {"composition": CAT, "merged_adapters": {"ids": ["a0"]}},
    }
    for param, body in cases.items():
        answer = post(body)
        assert answer.status_code == 400, (param, answer.text)
        assert answer.json()["error"]["param"] == param, answer.text
    mixed = post({"composition": {"adapters": [{"name": "a0"}, {"name": "a1"}]}})
    assert mixed.status_code == 400 and "mixes adapter types" in mixed.text
    assert post({"composition": {"adapters": [{"name": "a0"}, {"name": "nope"}]}}).status_code == 404
    ranks = post({"composition": {"adapters": [{"name": "a0"}, {"name": "a2"}], "method": "linear"}})
    assert ranks.status_code == 400 and "one rank" in ranks.text  # found when merging, at admission
    # the tenant may use a0 but not a2: a composition naming a2 is an unknown model to it
    assert post({"composition": {"adapters": [{"name": "a0"}]}}, headers=TENANT).status_code == 200
    assert post({"composition": CAT}, headers=TENANT).status_code == 404
    assert (
        httpx.post(url + "/v1/compositions", json={"name": "x", **CAT}, headers=TENANT, timeout=30).status_code == 403
    )
    assert (
        httpx.post(url + "/v1/compositions", json={"name": "a0", **CAT}, headers=ADMIN, timeout=30).status_code == 400
    )


def test_concurrent_compositions_share_one_materialization(server):
    """Many requests for one new TIES composition at once merge it once and all answer the same."""
    served, offline = server
    spec = {
        "adapters": [{"name": "a3", "weight": 0.9}, {"name": "a0", "weight": 0.2}],
        "method": "ties",
        "density": 0.7,
    }
    before = metric(
        httpx.get(served.url.removesuffix("/v1") + "/metrics", headers=ADMIN).text,
        "adapterhub_composition_materializations_total",
    )
    answers, errors = [], []

    def ask():
        try:
            body = {"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0, "composition": spec}
            answers.append(httpx.post(served.url + "/completions", json=body, headers=ADMIN, timeout=60).json())
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors and len(answers) == 6
    assert {a["choices"][0]["text"] for a in answers} == {offline.complete(spec, "abc", 5)}
    after = metric(
        httpx.get(served.url.removesuffix("/v1") + "/metrics", headers=ADMIN).text,
        "adapterhub_composition_materializations_total",
    )
    assert after - before == 1


def test_replacing_an_input_drops_its_materialization(dirs):
    backbone = Backbone(served_llama(), max_adapters=4, max_rank=8)
    engine = Engine(backbone, tiny_tokenizer(), base_name="tiny").start()
    try:
        for name in ("a0", "a3"):
            engine.add_adapter(name, str(dirs[name]))
        first = _run(engine, [(Composition.parse(TIES), "hello")], Sampling(max_tokens=4, temperature=0))
        assert sum(n.startswith("composition:") for n in backbone.names) == 1
        engine.add_adapter("a3", str(dirs["a2"]))  # a new version of an input: the old one is unloaded
        assert not any(n.startswith("composition:") for n in backbone.names)
        events, ended = [], threading.Event()  # a2 has another rank: TIES cannot combine them, found when merging
        engine.submit(Composition.parse(TIES), [5], Sampling(max_tokens=2), lambda e: (events.append(e), ended.set()))
        assert ended.wait(30) and isinstance(events[-1], Failed) and events[-1].status == 400
        assert "one rank" in events[-1].message and not engine._users  # nothing left counted or pinned
        assert not any(backbone.info(n).pinned for n in backbone.names)
        engine.add_adapter("a3", str(dirs["a3"]))  # the same files again: the same content, merged anew
        assert _run(engine, [(Composition.parse(TIES), "hello")], Sampling(max_tokens=4, temperature=0)) == first
    finally:
        engine.stop()


def test_a_failing_merge_fails_its_request_and_the_engine_serves_on(dirs, monkeypatch):
    backbone = Backbone(served_llama(), max_adapters=4, max_rank=8)
    engine = Engine(backbone, tiny_tokenizer(), base_name="tiny").start()
    try:
        for name in ("a0", "a3"):
            engine.add_adapter(name, str(dirs[name]))

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

        monkeypatch.setattr(type(backbone.types.get("lora")), "compose", broken)
        events, ended = [], threading.Event()
        engine.submit(Composition.parse(TIES), [5], Sampling(max_tokens=2), lambda e: (events.append(e), ended.set()))
        assert ended.wait(30) and isinstance(events[-1], Failed) and events[-1].status == 500
        assert _run(engine, [(None, "abc")], Sampling(max_tokens=3, temperature=0)) != [""]  # still serving
        assert not engine._users
    finally:
        engine.stop()


def test_compositions_that_need_every_slot_take_turns(dirs, tmp_path):
    """Two slots, two queued "cat" compositions of four different adapters: each needs both slots at
    once; neither may hold one slot while waiting for the other (that deadlocked)."""
    offline = Offline(dirs)
    backbone = Backbone(served_llama(), max_adapters=2, max_rank=8)
    engine = Engine(backbone, tiny_tokenizer(), base_name="tiny", max_batch=4, fair_wait=0.2)
    for name in ("a0", "a2", "a3"):
        engine.add_adapter(name, str(dirs[name]))
    engine.add_adapter("a4", str(dirs["a3"]))
    first = Composition.parse({"adapters": ["a0", "a3"]})
    second = Composition.parse({"adapters": ["a2", "a4"]})
    try:
        engine.start()
        texts = _run(engine, [(first, "hello"), (second, "hello")], Sampling(max_tokens=4, temperature=0), timeout=60)
        assert texts[0] == offline.complete({"adapters": ["a0", "a3"]}, "hello", 4)
        assert texts[1] == offline.complete({"adapters": ["a2", "a3"]}, "hello", 4)  # a4 holds a3's files
        with pytest.raises(RequestError, match="needs 3 adapter slots"):  # inputs and the merge never fit
            engine.submit(Composition.parse(TIES), [5], Sampling(max_tokens=2), lambda e: None)
    finally:
        engine.stop()


def test_two_merged_compositions_that_each_fit_take_turns(dirs, tmp_path):
    """Four slots, two TIES compositions of two inputs each (three slots each, with the merge): both
    requests' inputs loaded and pinned left no slot for either merge until one let go."""
    offline = Offline(dirs)
    backbone = Backbone(served_llama(), max_adapters=4, max_rank=8)
    engine = Engine(backbone, tiny_tokenizer(), base_name="tiny", max_batch=4, fair_wait=0.2)
    for name, files in (("a0", "a0"), ("a3", "a3"), ("a4", "a3"), ("a5", "a0")):
        engine.add_adapter(name, str(dirs[files]))
    first = Composition.parse(TIES)
    second = Composition.parse({**TIES, "adapters": [{"name": "a4", "weight": 0.7}, {"name": "a5", "weight": 0.6}]})
    with engine._lock:  # both admitted in one pass before any step: all four inputs pinned at once
        for composition in (first, second):
            engine.submit(composition, [5, 6], Sampling(max_tokens=2), lambda e: None)
        engine._admit()
    try:
        engine.start()
        texts = _run(
            engine, [(first, "hello"), (second, "hello"), (None, "abc")], Sampling(max_tokens=3, temperature=0)
        )
        reversed_ties = {**TIES, "adapters": [{"name": "a3", "weight": 0.7}, {"name": "a0", "weight": 0.6}]}
        assert texts[:2] == [offline.complete(TIES, "hello", 3), offline.complete(reversed_ties, "hello", 3)]
    finally:
        engine.stop()


def test_default_method_counts_its_merge_slot_even_when_evicted(dirs):
    """IA3 composes by "linear" (merged) by default: with two slots, two IA3 inputs and their merge
    never fit, whether the inputs are resident when the request comes or not."""
    backbone = Backbone(served_llama(), max_adapters=2, max_rank=8)
    engine = Engine(backbone, tiny_tokenizer(), base_name="tiny").start()
    try:
        engine.add_adapter("a1", str(dirs["a1"]))
        engine.add_adapter("b1", str(dirs["a1"]))
        engine.add_adapter("a0", str(dirs["a0"]))  # evicts a1
        ia3 = Composition.parse({"adapters": ["a1", "b1"]})
        with pytest.raises(RequestError, match="needs 3 adapter slots"):
            engine.submit(ia3, [5], Sampling(max_tokens=2), lambda e: None)
    finally:
        engine.stop()
