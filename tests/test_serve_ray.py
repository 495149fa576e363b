"""`adapterhub serve --ray` on a real local Ray cluster (two replicas, two adapter slots each): requests
stick to the replica holding their adapter, more adapters than a replica holds evict and reload
correctly, and a replica killed mid-request fails its requests with a retryable 503, never a hang,
after which every adapter answers correctly again. (The API tests of test_serve_api.py run against
this server too.)"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest
from serving import Offline, Server, make_model_dir, served_llama

pytestmark = pytest.mark.ray
PROMPT = "hello there"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    dirs = make_model_dir(root)
    long = served_llama()  # the same weights with room for long generations (Llama's rotary has no limit)
    long.config.max_position_embeddings = 4096
    long.save_pretrained(root / "base")
    server = Server(
        [
            "--ray",
            "--replicas",
            "2",
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
            "2",
            "--max-rank",
            "8",
        ],
        cwd=root,
    )
    yield server, Offline(dirs)
    server.stop()


@pytest.fixture(scope="module")
def http(setup):
    with httpx.Client(base_url=setup[0].url, timeout=60) as client:
        yield client


def _complete(http, model: str, max_tokens: int = 20):
    response = http.post(
        "/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )
    return response


STICKY_RUN = 8  # requests in a row that must all run on the one replica holding their adapter
PAUSES = (0.5, 1.0, 2.0, 4.0, 4.0, 4.0)  # before each try; under Ray's 10 s queue-length cache (see below)


def test_requests_stick_to_the_replica_holding_their_adapter(setup, http):
    """Each adapter gets a new version, which POST /v1/adapters loads on exactly one replica (its answer
    names it); then STICKY_RUN requests for it in a row must all run on that replica.

    Ray's router learns where a version lives only from the replica's report to Ray's controller and the
    controller's next long-poll round to the ingress (about a second, more on a loaded machine). Until
    then it sends the version's requests to the replicas holding the fewest adapters, which may be the
    other one: that one loads it too, and from then on Ray rightly spreads its requests over both holders
    however long one waits. So a try whose requests left the holder started before the router knew; it
    is made again on a new version (one replica again), after a longer pause. The pauses stay under the
    10 s for which Ray's router trusts its last queue length of the holder: past that it probes the
    holder first, with a 0.1 s deadline that a busy machine can miss, and on a miss also falls back."""
    offline = setup[1]
    for name in ("a0", "a1", "a2"):
        expected = offline.complete(name, PROMPT, 20, ignore_eos=True)
        tries = []
        for pause in PAUSES:
            added = http.post("/adapters", json={"name": name, "source": name})
            assert added.status_code == 201, added.text
            holder, served = added.json()["replica"], []
            time.sleep(pause)
            while len(served) < STICKY_RUN and served.count(holder) == len(served):
                response = _complete(http, name)
                assert response.status_code == 200, response.text
                assert response.json()["choices"][0]["text"] == expected, name
                served.append(response.headers["x-adapterhub-replica"])
            tries.append((holder, served))
            if served == [holder] * STICKY_RUN:
                break
        else:
            pytest.fail(f"{name}'s requests never stuck to the replica holding it (holder, served by): {tries}")


def test_more_adapters_than_a_replica_holds(setup, http):
    offline = setup[1]
    assert http.post("/adapters", json={"name": "a3", "source": "a3"}).status_code == 201
    jobs = ["a0", "a1", "a2", "a3", None] * 3  # 4 adapters, 2 slots per replica: Ray's LRU unloads and reloads
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda n: _complete(http, n or "tiny"), jobs))
    for name, answer in zip(jobs, answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == offline.complete(name, PROMPT, 20, ignore_eos=True), name


def _stream(url: str, model: str, started: concurrent.futures.Future | None) -> str:
    """Reads one long streamed completion; returns "ok", or "503" for an error event / status 503."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/completions", json=body, timeout=60) as response:
        if response.status_code != 200:
            return str(response.status_code)
        if started is not None:
            started.set_result(response.headers["x-adapterhub-replica"])
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    return str(event["error"]["code"])
    return "ok"


def test_a_killed_replica_fails_its_requests_retryably_and_is_replaced(setup, http):
    server, offline = setup
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        started = concurrent.futures.Future()
        victim = pool.submit(_stream, server.url, "a0", started)
        others = [pool.submit(_stream, server.url, name, None) for name in ("a0", "a1", "tiny")]
        pid = int(started.result(timeout=30).rsplit(":", 1)[1])
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        outcomes = [f.result(timeout=90) for f in [victim, *others]]  # none hangs
    assert outcomes[0] == "503"
    assert set(outcomes) <= {"ok", "503"}
    deadline = time.monotonic() + 90
    for name in ("a0", "a1", "a2", "a3", "tiny"):
        while True:
            response = _complete(http, name)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            assert response.status_code == 503, response.text  # retryable while Ray replaces the replica
            time.sleep(1)
        adapter = None if name == "tiny" else name
        assert response.json()["choices"][0]["text"] == offline.complete(adapter, PROMPT, 20, ignore_eos=True)


def test_the_deployment_config_builds_the_application():
    import yaml
    from ray.serve import Application

    from adapterhub.serve import ray_app

    with open(os.path.join(os.path.dirname(__file__), "..", "deploy", "ray-serve.yaml")) as file:
        config = yaml.safe_load(file)
    (app,) = config["applications"]
    assert app["import_path"] == "adapterhub.serve.ray_app:from_config"
    assert isinstance(ray_app.from_config(app["args"]), Application)
