"""`adapterhub serve --ray` on a real local Ray cluster (two engine replicas with two adapter slots each,
two ingress replicas): requests stick to the replica holding their adapter, more adapters than a replica
holds evict and reload correctly, a replica killed mid-request fails its requests with a retryable 503,
never a hang, after which every adapter answers correctly again; the adapter registry is shared by the
ingresses, followed by the replicas, and outlives the ingresses and its own actor. (The API tests of
test_serve_api.py run against this server too.)"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import threading
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
            "--ingress-replicas",
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
    yield server, Offline(dirs), dirs
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
    server, offline, _ = setup
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
    assert ray_app.from_config({**app["args"], "ingress_replicas": 3})._bound_deployment.num_replicas == 3


# ---- the adapter registry: shared by the ingresses, followed by the replicas, outliving both -------------


@pytest.fixture(scope="module")
def cluster(setup):
    """This process as a Ray driver on the server's cluster (its address is in the ready line)."""
    import ray

    (line,) = [line for line in setup[0].lines if line.startswith("adapterhub serve: ready on ")]
    from ray._raylet import Config

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "token")  # a local cluster's default: its token is in ~/.ray/auth_token
        Config.initialize("")  # Ray's settings read the environment again
        ray.init(address=re.search(r"cluster (\S+)\)$", line.strip()).group(1), log_to_driver=False)
        yield ray
        ray.shutdown()
    Config.initialize("")


@pytest.fixture(scope="module")
def run(cluster):
    """Runs a coroutine on an event loop of its own thread (where an extra ingress lives)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield lambda coroutine, timeout=60: asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _store(ray):
    from adapterhub.serve.ray_app import APP_NAME
    from adapterhub.serve.ray_registry import NAMESPACE, registry_name

    return ray.get_actor(registry_name(APP_NAME), namespace=NAMESPACE)


def _engine_replicas(deadline: float, until) -> dict[str, dict]:
    """Each engine replica's health (asked through Ray's router until both answered, then again until
    `until(healths)` holds). Past `deadline` every answer must already hold; the router may still take
    a while to reach the second replica (a minute at most)."""
    from ray import serve

    from adapterhub.serve.ray_app import APP_NAME

    handle = serve.get_deployment_handle("EngineReplica", app_name=APP_NAME)
    healths: dict[str, dict] = {}
    late: dict[str, dict] = {}  # answers after the deadline
    while True:
        health = handle.health.remote().result(timeout_s=30)
        healths[health["replica"]] = health
        if len(healths) == 2 and until(healths):
            return healths
        if time.monotonic() >= deadline:
            assert until({health["replica"]: health}), f"a replica never got there: {health}"
            late[health["replica"]] = health
            if len(late) == 2:
                return late
            assert time.monotonic() < deadline + 60, f"only one engine replica answered: {healths}"
        time.sleep(0.05)


async def _text(backend, model: str) -> str:
    """A completion through `backend` (an ingress's RayBackend), as the HTTP app runs it."""
    from adapterhub.serve.api import CompletionRequest
    from adapterhub.serve.engine import Token

    body = CompletionRequest(model=model, prompt=PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
    text = ""
    async for item in backend.generate(model, body):
        if isinstance(item, tuple) and isinstance(item[1], Token):
            text += item[1].text
    return text


def _ingresses(http, count: int, deadline: float, exclude=frozenset()) -> dict[str, int]:
    """ingress id -> its registry epoch, from /health, until `count` ingresses not in `exclude` answered."""
    seen: dict[str, int] = {}
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only these ingresses answered: {seen}"
        try:
            response = http.get(str(http.base_url).removesuffix("/v1/") + "/health", timeout=5)
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 200 and response.json()["ingress"] not in exclude:
            seen[response.json()["ingress"]] = response.json()["registry_epoch"]
        else:
            time.sleep(0.2)
    return seen


def test_two_ingresses_see_each_others_posts_and_deletes(setup, http, run, cluster):
    """Both ingress replicas of the server serve, and a third ingress (a RayBackend in this process, on the
    same store and replicas) sees what goes through them, and they what goes through it: a new name at
    once, a replacement or deletion within the documented bound (STALE_AFTER; milliseconds in practice).
    With its copy of the registry frozen (its follower stopped), the third one still finds a new name at
    once (it asks the store), and a replaced or deleted version it sends is refused by the replicas, so
    that it answers with the live version, or 404."""
    from ray import serve

    from adapterhub.serve.errors import ApiError
    from adapterhub.serve.ray_app import APP_NAME, RayBackend
    from adapterhub.serve.ray_registry import STALE_AFTER, RemoteStore

    offline = setup[1]
    expected = {name: offline.complete(name, PROMPT, 20, ignore_eos=True) for name in ("a2", "a3")}
    assert len(_ingresses(http, 2, time.monotonic() + 30)) == 2

    async def third_ingress():
        replicas = serve.get_deployment_handle("EngineReplica", app_name=APP_NAME)
        backend = RayBackend(replicas, "tiny", {}, store=RemoteStore(APP_NAME), ingress="test")
        await backend.start()
        return backend

    other = run(third_ingress())
    # POST through the server's ingresses: this one finds the new name at once
    assert http.post("/adapters", json={"name": "x", "source": "a3"}).status_code == 201
    assert run(_text(other, "x")) == expected["a3"]
    # POST through this one: every request through the server's ingresses finds it at once
    run(other.add_adapter("y", str(setup[2]["a2"]), None, "a2"))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _complete(http, "y"), range(8)))
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert {a.json()["choices"][0]["text"] for a in answers} == {expected["a2"]}
    # DELETE through this one: both server ingresses have its epoch, and answer 404, within the bound
    assert run(other.remove_adapter("y")) == 0
    deleted, epoch = time.monotonic(), run(other.store.get("y")).epoch
    while True:
        epochs = _ingresses(http, 2, deleted + STALE_AFTER)
        if min(epochs.values()) >= epoch:
            break
    answers = [_complete(http, "y") for _ in range(6)]
    assert [a.status_code for a in answers] == [404] * 6
    message = answers[0].json()["error"]["message"]
    assert "GET /v1/models" in message and "available" not in message and "a0" not in message
    # DELETE and replace through the server's ingresses: this one follows within the bound
    assert http.delete("/adapters/x").status_code == 200
    assert http.post("/adapters", json={"name": "a2", "source": "a3"}).status_code == 201
    deadline = time.monotonic() + STALE_AFTER
    while True:
        try:
            run(_text(other, "x"))
        except ApiError as error:
            if error.status == 404 and run(_text(other, "a2")) == expected["a3"]:
                break
        assert time.monotonic() < deadline, "the third ingress did not see the DELETE and the replacement"
        time.sleep(0.05)

    other.registry.stop()  # from here on its copy changes only when it asks the store itself
    assert http.post("/adapters", json={"name": "w", "source": "a3"}).status_code == 201
    assert run(_text(other, "w")) == expected["a3"]
    old = other.registry.live("a2").model_id
    assert http.post("/adapters", json={"name": "a2", "source": "a2"}).status_code == 201
    assert http.delete("/adapters/w").status_code == 200
    gone = cluster.get(_store(cluster).get.remote("w")).model_id
    _engine_replicas(
        time.monotonic() + STALE_AFTER, lambda h: all(not {old, gone} & {*r["adapters"]} for r in h.values())
    )
    assert other.registry.live("a2").model_id == old and other.registry.live("w") is not None  # still the old copy
    assert run(_text(other, "a2")) == expected["a2"]
    with pytest.raises(ApiError) as error:
        run(_text(other, "w"))
    assert error.value.status == 404
    other.shutdown()


def test_replaced_and_deleted_versions_leave_the_replicas(setup, http, cluster):
    """A replaced version leaves the replica that held it (its engine and Ray's multiplexed cache) without
    waiting for Ray's LRU, and a deleted one leaves every replica, within the bound."""
    from adapterhub.serve.ray_registry import STALE_AFTER

    offline = setup[1]
    added = http.post("/adapters", json={"name": "z", "source": "a3"})
    assert added.status_code == 201, added.text
    holder, old = added.json()["replica"], cluster.get(_store(cluster).get.remote("z")).model_id
    healths = _engine_replicas(time.monotonic() + 30, lambda h: True)
    assert old in healths[holder]["adapters"] and old in healths[holder]["multiplexed"]
    assert http.post("/adapters", json={"name": "z", "source": "a2"}).status_code == 201
    new = cluster.get(_store(cluster).get.remote("z")).model_id
    assert new != old

    def without(model_id):
        return lambda h: all(model_id not in r["adapters"] + r["multiplexed"] for r in h.values())

    _engine_replicas(time.monotonic() + STALE_AFTER, without(old))
    response = _complete(http, "z")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == offline.complete("a2", PROMPT, 20, ignore_eos=True)
    assert http.delete("/adapters/z").status_code == 200
    _engine_replicas(time.monotonic() + STALE_AFTER, without(new))


def test_runtime_adapters_outlive_the_ingresses_and_the_registry_actor(setup, http, cluster):
    """Adapters POSTed at runtime (a new name, and a replacement of an --adapter one) are served the same
    after both ingress replicas are killed and Serve has started new ones, with the registry's actor
    killed too (Ray restarts it from the GCS): nothing rolled back, version numbers still growing, and no
    server path in the listing."""
    offline = setup[1]
    assert http.post("/adapters", json={"name": "r", "source": "a3"}).status_code == 201
    assert http.post("/adapters", json={"name": "a1", "source": "a2"}).status_code == 201
    number = cluster.get(_store(cluster).get.remote("r")).number
    ingresses = set(_ingresses(http, 2, time.monotonic() + 30))

    cluster.kill(_store(cluster), no_restart=False)
    for actor in cluster.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and "#Ingress#" in actor["name"]:
            cluster.kill(cluster.get_actor(actor["name"], namespace="serve"), no_restart=True)
    assert len(_ingresses(http, 2, time.monotonic() + 120, exclude=ingresses)) == 2  # both replaced

    for name, weights in (("r", "a3"), ("a1", "a2"), ("a0", "a0")):
        response = _complete(http, name)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == offline.complete(weights, PROMPT, 20, ignore_eos=True), name
    data = http.get("/adapters").json()["data"]
    listing = {a["id"]: a["source"] for a in data}
    assert listing["r"] == "a3" and listing["a1"] == "a2"  # as the POSTs gave them
    assert not any(os.sep in source for source in listing.values()), listing  # no server path
    assert all(len(a["digest"]) == 64 for a in data), data  # each version's content, as its replica read it
    assert http.post("/adapters", json={"name": "r", "source": "a3"}).status_code == 201
    assert cluster.get(_store(cluster).get.remote("r")).number > number
