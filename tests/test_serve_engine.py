"""The serving engine in process: rows joining and leaving a running batch give what each row gives
alone; adapters evicted for lack of slots come back; removal waits; cancelled rows let go."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from serving import Offline, make_model_dir, served_llama
from tiny_models import tiny_tokenizer

from adapterhub import Backbone
from adapterhub.serve.engine import Engine, Failed, Finished, Token
from adapterhub.serve.sampling import Sampling, TextStream, next_tokens


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("engine"))


def _run(engine: Engine, jobs, sampling: Sampling, timeout: float = 60) -> list[str]:
    texts = [""] * len(jobs)
    done = threading.Semaphore(0)

    def collect(k):
        def on_event(event):
            if isinstance(event, Token):
                texts[k] += event.text
            elif isinstance(event, (Finished, Failed)):
                assert not isinstance(event, Failed), event
                done.release()

        return on_event

    for k, (name, prompt) in enumerate(jobs):
        engine.submit(name, engine.tokenizer(prompt)["input_ids"], sampling, collect(k))
    for _ in jobs:
        assert done.acquire(timeout=timeout)
    return texts


def test_more_adapters_than_slots_are_evicted_and_reloaded(dirs):
    offline = Offline(dirs)
    backbone = Backbone(served_llama(), max_adapters=2, max_rank=8)
    engine = Engine(backbone, tiny_tokenizer(), base_name="tiny", max_batch=3).start()
    try:
        for name in ("a0", "a1", "a2", "a3"):
            engine.add_adapter(name, str(dirs[name]))
        jobs = [(name, prompt) for prompt in ("hello", "xyz") for name in ("a0", "a1", None, "a2", "a3")]
        texts = _run(engine, jobs, Sampling(max_tokens=12, temperature=0, ignore_eos=True))
        assert texts == [offline.complete(n, p, 12, ignore_eos=True) for n, p in jobs]
        assert backbone.evictions >= 3
        assert not any(backbone.info(n).pinned for n in backbone.names)  # nothing left pinned
    finally:
        engine.stop()


def test_remove_waits_for_requests_in_flight_and_cancel_lets_go(dirs):
    engine = Engine(Backbone(served_llama(), max_adapters=4, max_rank=8), tiny_tokenizer(), base_name="tiny").start()
    try:
        engine.add_adapter("a0", str(dirs["a0"]))
        finished = threading.Event()
        engine.submit(
            "a0",
            [5, 6, 7],
            Sampling(max_tokens=50, temperature=0, ignore_eos=True),
            lambda e: finished.set() if isinstance(e, Finished) else None,
        )
        started = time.perf_counter()
        engine.remove_adapter("a0", timeout=60)
        assert finished.is_set(), "remove_adapter returned before the request in flight finished"
        assert engine.adapters() == {} and engine.backbone.names == []
        assert time.perf_counter() - started < 60

        engine.add_adapter("a1", str(dirs["a1"]))
        tokens = []
        request = engine.submit(
            "a1", [5, 6, 7], Sampling(max_tokens=55, temperature=0, ignore_eos=True), lambda e: tokens.append(e)
        )
        deadline = time.monotonic() + 30
        while not tokens and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tokens, "no token within 30 s"
        request.cancel()
        deadline = time.monotonic() + 30
        while engine.running_rows() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running_rows() == 0 and not engine.backbone.info(engine.adapters()["a1"].name).pinned
        assert not any(isinstance(e, Finished) for e in tokens) and len(tokens) < 55
    finally:
        engine.stop()


def _held_request(engine: Engine, adapter: str) -> tuple[threading.Event, threading.Event]:
    """Submits a request for `adapter` whose first event holds the engine thread until the returned
    `release` is set, so it is certainly in flight meanwhile; `finished` is set when it ends."""
    release, finished = threading.Event(), threading.Event()

    def on_event(event):
        release.wait(30)
        if isinstance(event, (Finished, Failed)):
            finished.set()

    engine.submit(adapter, [5, 6, 7], Sampling(max_tokens=4, temperature=0, ignore_eos=True), on_event)
    return release, finished


def _wait_unloaded(engine: Engine) -> None:
    deadline = time.monotonic() + 30
    while engine.backbone.names and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.backbone.names == [], "the slot was not freed after the last request ended"


def test_remove_without_waiting_returns_what_is_in_flight_and_unloads_later(dirs):
    engine = Engine(Backbone(served_llama(), max_adapters=2, max_rank=8), tiny_tokenizer(), base_name="tiny").start()
    try:
        engine.add_adapter("a0", str(dirs["a0"]))
        release, finished = _held_request(engine, "a0")
        started = time.perf_counter()
        assert engine.remove_adapter("a0", timeout=0) == 1
        assert time.perf_counter() - started < 5 and "a0" not in engine.adapters()
        release.set()
        assert finished.wait(30)
        _wait_unloaded(engine)
    finally:
        engine.stop()


def test_ray_unload_never_blocks_its_finalizer(dirs):
    ray_app = pytest.importorskip("adapterhub.serve.ray_app", reason="the ray extra is not installed")
    engine = Engine(Backbone(served_llama(), max_adapters=2, max_rank=8), tiny_tokenizer(), base_name="tiny").start()
    try:
        engine.add_adapter("a0@1", str(dirs["a0"]))
        release, finished = _held_request(engine, "a0@1")
        loaded = ray_app._Loaded(engine, "a0@1")
        started = time.perf_counter()
        loaded.__del__()  # what Ray's LRU does on unload, with the adapter's request still running
        assert time.perf_counter() - started < 5, "the finalizer waited for the request in flight"
        assert "a0@1" not in engine.adapters()
        loaded.__del__()  # again at garbage collection: nothing left to do, nothing raised
        release.set()
        assert finished.wait(30)
        _wait_unloaded(engine)
    finally:
        engine.stop()


def test_ray_delete_waits_for_forwarded_requests_at_most_its_timeout():
    ray_app = pytest.importorskip("adapterhub.serve.ray_app", reason="the ray extra is not installed")

    async def delete(finish_after: float | None) -> tuple[int, float]:
        backend = ray_app.RayBackend(None, "tiny", {"a": "/adapters/a"}, delete_timeout=0.3)
        backend._in_flight["a"] = 1  # a request forwarded to a replica, not finished

        async def finish():
            await asyncio.sleep(finish_after)
            backend._in_flight["a"] -= 1
            backend._idle.set()

        task = asyncio.ensure_future(finish()) if finish_after is not None else None
        started = time.perf_counter()
        in_flight = await backend.remove_adapter("a")
        assert await backend.adapters() == []  # gone for new requests at once
        if task is not None:
            await task
        return in_flight, time.perf_counter() - started

    in_flight, seconds = asyncio.run(delete(None))
    assert in_flight == 1 and 0.25 < seconds < 5
    in_flight, seconds = asyncio.run(delete(0.05))
    assert in_flight == 0 and seconds < 0.25


def test_delete_past_its_deadline_answers_202_with_the_requests_in_flight(dirs):
    from fastapi.testclient import TestClient

    from adapterhub.serve.app import create_app
    from adapterhub.serve.backend import LocalBackend

    engine = Engine(Backbone(served_llama(), max_adapters=2, max_rank=8), tiny_tokenizer(), base_name="tiny").start()
    engine.add_adapter("a0", str(dirs["a0"]))
    with TestClient(create_app(LocalBackend(engine, delete_timeout=0.3))) as client:  # stops the engine at exit
        release, finished = _held_request(engine, "a0")
        try:
            response = client.delete("/v1/adapters/a0")
            assert response.status_code == 202, response.text
            assert response.json() == {"id": "a0", "object": "adapter", "deleted": True, "in_flight": 1}
            assert client.get("/v1/models").json()["data"][1:] == []  # gone for new requests already
        finally:
            release.set()
        assert finished.wait(30)
        _wait_unloaded(engine)
        engine.add_adapter("a0", str(dirs["a0"]))
        response = client.delete("/v1/adapters/a0")
        assert response.status_code == 200 and response.json()["in_flight"] == 0


def test_text_stream_holds_back_possible_stops():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("say STOP now", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, ("STOP", "xx"))
    pieces = []
    for token in ids:
        pieces.append(stream.add(token))
        if stream.stopped:
            break
    assert "".join(pieces) == "say " and stream.stopped
    assert pieces[4] == "" and pieces[5] == ""  # "S", "ST" might begin "STOP": held back
    stream = TextStream(tokenizer, ("STOPPED",))
    assert "".join(stream.add(t) for t in ids) + stream.add(None) == "say STOP now"


def test_next_tokens_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    generators = [None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    samplings = [Sampling(1, temperature=0), Sampling(1, top_p=1e-6), Sampling(1)]
    assert next_tokens(logits, samplings, generators).tolist()[:2] == [1, 0]
    hot = [Sampling(1, temperature=2.0)]
    draws = {next_tokens(logits[2:], hot, [torch.Generator().manual_seed(s)]).item() for s in range(40)}
    assert draws == {0, 1, 2}  # temperature 2 flattens: every token comes up
