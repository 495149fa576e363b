"""Faults stay with the request that caused them, and the engine protects itself: a failure in one
row's forward, sampling or event delivery fails that request alone (answered, its adapter unpinned)
while the others finish exactly as they would alone; extreme sampling values serve; the queue is
bounded with a fair share per key and admits keys round robin; loads wait for a slot; stop drains;
listings survive adapter churn."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest
from serving import Offline, make_model_dir, served_llama
from tiny_models import broken_copy, tiny_tokenizer

import adapterhub.serve.engine as engine_module
from adapterhub import Backbone, NoFreeSlot
from adapterhub.serve.admission import FairQueue, Limits
from adapterhub.serve.api import CompletionRequest
from adapterhub.serve.backend import LocalBackend, generate
from adapterhub.serve.engine import Engine, Failed, Finished, Token
from adapterhub.serve.errors import ApiError, Overloaded, RequestError
from adapterhub.serve.sampling import Sampling

GREEDY = Sampling(max_tokens=8, temperature=0, ignore_eos=True)
MARK = 77  # a prompt token whose forward the tests make fail


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def offline(dirs):
    return Offline(dirs)


def _engine(dirs, slots: int = 4, adapters=("a0", "a1"), **settings) -> Engine:
    engine = Engine(
        Backbone(served_llama(), max_adapters=slots, max_rank=8), tiny_tokenizer(), base_name="tiny", **settings
    )
    for name in adapters:
        engine.add_adapter(name, str(dirs[name]))
    return engine


class _Outcome:
    """What one request received: its text, and its Finished or Failed event."""

    def __init__(self):
        self.text, self.end, self.done = "", None, threading.Event()

    def __call__(self, event):
        if isinstance(event, Token):
            self.text += event.text
        else:
            self.end = event
            self.done.set()

    def wait(self) -> _Outcome:
        assert self.done.wait(60), "no answer within 60 s"
        return self


def _submit(engine: Engine, adapter, prompt: list[int], sampling: Sampling = GREEDY, tenant: str = "") -> _Outcome:
    outcome = _Outcome()
    engine.submit(adapter, prompt, sampling, outcome, tenant)
    return outcome


def _ids(offline: Offline, text: str) -> list[int]:
    return offline.ids(text)


def _assert_unpinned(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    while any(engine.backbone.info(n).pinned for n in engine.backbone.names) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(engine.backbone.info(n).pinned for n in engine.backbone.names), "a failed request kept its pin"


def test_a_failing_forward_fails_only_its_request(dirs, offline):
    engine = _engine(dirs)
    real = engine._step_model

    def forward(**inputs):  # fails whenever the marked prompt is in the step
        if (inputs["input_ids"] == MARK).any():
            raise RuntimeError("injected fault")
        return real(**inputs)

    engine._step_model = forward
    good = [("a0", "hello"), ("a1", "xyz"), (None, "abc")]
    outcomes = [_submit(engine, name, _ids(offline, text)) for name, text in good]
    bad = _submit(engine, "a0", [5, MARK, 6])  # queued together: one batch, all of them in its first step
    engine.start()
    try:
        assert isinstance(bad.wait().end, Failed) and "injected fault" in bad.end.message and bad.end.status == 500
        for (name, text), outcome in zip(good, outcomes):
            assert isinstance(outcome.wait().end, Finished)
            assert outcome.text == offline.complete(name, text, 8, ignore_eos=True)
        _assert_unpinned(engine)
        assert engine.remove_adapter("a0", timeout=5) == 0  # nothing holds it: it unloads at once
        after = _submit(engine, "a1", _ids(offline, "again")).wait()  # the engine keeps serving
        assert after.text == offline.complete("a1", "again", 8, ignore_eos=True)
    finally:
        engine.stop()


def test_a_failing_sample_fails_only_its_request(dirs, offline, monkeypatch):
    real = engine_module.next_tokens

    def next_tokens(logits, samplings, generators):
        if any(s.temperature == 0.777 for s in samplings):
            raise RuntimeError("injected sampling fault")
        return real(logits, samplings, generators)

    monkeypatch.setattr(engine_module, "next_tokens", next_tokens)
    engine = _engine(dirs)
    good = [_submit(engine, name, _ids(offline, "hello")) for name in ("a0", "a1", None)]
    bad = _submit(engine, "a1", _ids(offline, "hello"), Sampling(max_tokens=8, temperature=0.777, n=2))
    engine.start()
    try:
        assert isinstance(bad.wait().end, Failed) and "injected sampling fault" in bad.end.message
        for name, outcome in zip(("a0", "a1", None), good):
            assert isinstance(outcome.wait().end, Finished)
            assert outcome.text == offline.complete(name, "hello", 8, ignore_eos=True)
        _assert_unpinned(engine)
        assert engine.running_rows() == 0 and engine.kv.blocks.used() == 0  # the failed rows gave their blocks back
    finally:
        engine.stop()


def test_failing_logprobs_fail_only_the_requests_that_asked(dirs, offline, monkeypatch):
    def broken(*args):
        raise RuntimeError("injected logprobs fault")

    monkeypatch.setattr(engine_module, "logprobs_of", broken)
    engine = _engine(dirs)
    plain = _submit(engine, "a0", _ids(offline, "hello"))
    asking = _submit(engine, "a1", _ids(offline, "hello"), Sampling(max_tokens=8, temperature=0, logprobs=2))
    engine.start()
    try:
        assert isinstance(asking.wait().end, Failed) and "injected logprobs fault" in asking.end.message
        assert isinstance(plain.wait().end, Finished)
        assert plain.text == offline.complete("a0", "hello", 8, ignore_eos=True)
        _assert_unpinned(engine)
        assert engine.running_rows() == 0 and engine.kv.blocks.used() == 0
    finally:
        engine.stop()


def test_a_receiver_that_fails_cancels_only_its_request(dirs, offline):
    engine = _engine(dirs)

    def broken(event):
        raise RuntimeError("the client's loop is closed")

    engine.submit("a0", _ids(offline, "hello"), Sampling(max_tokens=30, temperature=0, ignore_eos=True), broken)
    good = _submit(engine, "a0", _ids(offline, "xyz"))
    engine.start()
    try:
        assert good.wait().text == offline.complete("a0", "xyz", 8, ignore_eos=True)
        deadline = time.monotonic() + 10
        while engine.running_rows() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running_rows() == 0
        _assert_unpinned(engine)
    finally:
        engine.stop()


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(max_tokens=6, temperature=1.0, top_p=5e-324, seed=1),  # top_p 0 in fp32: the top token stays
        Sampling(max_tokens=6, temperature=0.5, seed=2**64 - 1, n=3),  # seed + choice past manual_seed's range
        Sampling(max_tokens=6, temperature=1.0, seed=-(2**63), n=2),
    ],
)
def test_extreme_sampling_values_serve(dirs, offline, sampling):
    engine = _engine(dirs, adapters=("a0",)).start()
    try:
        outcome = _Outcome()
        engine.submit("a0", _ids(offline, "hello"), sampling, outcome)
        assert isinstance(outcome.wait().end, Finished), outcome.end
    finally:
        engine.stop()


def test_top_p_below_fp32_is_greedy(dirs, offline):
    engine = _engine(dirs, adapters=("a0",)).start()
    try:
        sampled = _submit(engine, "a0", _ids(offline, "hello"), Sampling(max_tokens=8, top_p=1e-300, ignore_eos=True))
        assert sampled.wait().text == offline.complete("a0", "hello", 8, ignore_eos=True)
    finally:
        engine.stop()


def test_the_queue_is_bounded_with_a_fair_share_per_key(dirs):
    engine = _engine(dirs, adapters=(), limits=Limits(max_queue=4, max_queue_tokens=40))  # not started: nothing drains
    for _ in range(4):
        _submit(engine, None, [5, 6, 7], tenant="A")
    with pytest.raises(Overloaded) as full:
        _submit(engine, None, [5, 6, 7], tenant="A")
    assert full.value.retry_after >= 1 and "4 of them yours" in str(full.value)
    _submit(
        engine, None, [5, 6, 7], tenant="B"
    )  # a key with nothing waiting still gets in: A's burst cannot lock B out
    with pytest.raises(Overloaded):  # now B holds one of a full queue too
        _submit(engine, None, [5, 6, 7], tenant="B")
    with pytest.raises(RequestError, match="more than the server queues"):  # could never fit: 400, not 429
        engine.submit_many(None, [[5]] * 5, GREEDY, lambda k, e: None, "C")
    assert engine.queue_depth() == 5
    engine.stop()  # answers every queued request (503)

    engine = _engine(dirs, adapters=(), limits=Limits(max_queue=4, max_queue_tokens=40))
    _submit(engine, None, [5] * 30, tenant="C")  # while there is room, a key's first prompt may be big
    with pytest.raises(Overloaded):  # C's next one would pass the queue's 40 prompt tokens
        _submit(engine, None, [5] * 30, tenant="C")
    engine.stop()


def test_keys_take_turns_to_join_the_batch():
    queue = FairQueue(100, 10_000)

    class Waiting:
        def __init__(self, tenant, submitted):
            self.tenant, self.cost, self.submitted = tenant, 1, submitted

    burst = [Waiting("A", t) for t in range(5)]
    late = Waiting("B", 10)
    for request in [*burst, late]:
        queue.add(request)
    assert queue.fair_order({})[:2] == [burst[0], late]
    queue.remove(burst[0], admitted=True)  # A had its turn: B goes first now, though A's requests are older
    assert queue.fair_order({})[0] is late
    assert queue.fair_order({"B": 3})[0] is burst[1]  # B has rows running, A none: A first


def test_a_burst_of_one_key_does_not_delay_another_key(dirs, offline):
    engine = _engine(dirs, adapters=(), max_batch=1, max_step_tokens=8)
    long = Sampling(max_tokens=20, temperature=0, ignore_eos=True)
    burst = [_submit(engine, None, [5, 6, 7], long, tenant="A") for _ in range(5)]
    other = _submit(engine, None, [5, 6, 7], long, tenant="B")
    engine.start()
    try:
        other.wait()
        finished = sum(o.done.is_set() for o in burst)
        assert finished <= 2, f"B waited for {finished} of A's requests (FIFO would make it 5)"
        for outcome in burst:
            outcome.wait()
    finally:
        engine.stop()


def _hold(engine: Engine) -> threading.Event:
    """Submits a request for a0 whose first event holds the engine thread (a0 pinned, its row in
    flight) until the returned event is set; returns once it holds."""
    release, holding = threading.Event(), threading.Event()

    def held(event):
        holding.set()
        release.wait(30)

    engine.submit("a0", [5, 6, 7], Sampling(max_tokens=3, temperature=0, ignore_eos=True), held)
    assert holding.wait(30)
    return release


def test_a_load_waits_for_a_slot_held_by_requests_in_flight(dirs, offline):
    engine = _engine(dirs, slots=1, adapters=("a0",), limits=Limits(load_wait=30)).start()
    try:
        release = _hold(engine)
        loaded = []
        loader = threading.Thread(target=lambda: loaded.append(engine.add_adapter("a1", str(dirs["a1"]))))
        loader.start()
        time.sleep(0.5)
        assert loader.is_alive(), "the load did not wait for the pinned slot"
        release.set()
        loader.join(30)
        assert loaded and loaded[0].name.startswith("a1#")
        assert _submit(engine, "a1", _ids(offline, "hi")).wait().text == offline.complete(
            "a1", "hi", 8, ignore_eos=True
        )
    finally:
        release.set()
        engine.stop()


def test_a_load_gives_up_after_its_wait(dirs):
    engine = _engine(dirs, slots=1, adapters=("a0",), limits=Limits(load_wait=0.3)).start()
    release = _hold(engine)
    try:
        started = time.perf_counter()
        with pytest.raises(NoFreeSlot):
            engine.add_adapter("a1", str(dirs["a1"]))
        assert 0.3 <= time.perf_counter() - started < 10
        assert "a1" not in engine.adapters() and "a0" in engine.adapters()
    finally:
        release.set()
        engine.stop()


def test_stop_drains_the_requests_in_flight_then_fails_the_rest(dirs, offline):
    engine = _engine(dirs, adapters=("a0",)).start()
    drained = _submit(engine, "a0", _ids(offline, "hello"), Sampling(max_tokens=12, temperature=0, ignore_eos=True))
    engine.stop(drain=30)
    assert isinstance(drained.wait().end, Finished)
    assert drained.text == offline.complete("a0", "hello", 12, ignore_eos=True)
    with pytest.raises(Overloaded, match="shutting down"):
        _submit(engine, "a0", [5])

    engine = _engine(dirs, adapters=("a0",))
    queued = _submit(engine, "a0", [5, 6])  # never started: still queued at the stop
    engine.stop()
    assert isinstance(queued.wait().end, Failed) and queued.end.status == 503

    engine = _engine(dirs, adapters=("a0",)).start()
    cut, first = _Outcome(), threading.Event()

    def slow(event):  # a slow consumer: the row is certainly still running when stop() comes
        first.set()
        time.sleep(0.05)
        cut(event)

    engine.submit("a0", [5, 6], Sampling(max_tokens=60, temperature=0, ignore_eos=True), slow)
    assert first.wait(30)
    engine.stop(drain=0)
    assert isinstance(cut.wait().end, Failed) and cut.end.status == 503
    _assert_unpinned(engine)


def test_a_request_past_its_deadline_gets_504_and_leaves(dirs):
    engine = _engine(dirs, adapters=(), limits=Limits(request_timeout=0.3)).start()
    release = threading.Event()
    try:
        engine.submit(
            None, [5, 6], Sampling(max_tokens=3, temperature=0), lambda e: release.wait(30)
        )  # holds the thread

        async def run():
            body = CompletionRequest(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0)
            events = generate(engine, None, body, "here")
            await anext(events)
            with pytest.raises(ApiError) as late:
                async for _ in events:
                    pass
            return late.value

        started = time.perf_counter()
        error = asyncio.run(run())
        assert error.status == 504 and 0.3 <= time.perf_counter() - started < 10
        release.set()
        deadline = time.monotonic() + 10
        while (engine.running_rows() or engine.queue_depth()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running_rows() == 0 and engine.queue_depth() == 0
    finally:
        release.set()
        engine.stop()


def _generated(engine: Engine) -> float:
    return engine.metrics.registry.get_sample_value("adapterhub_generated_tokens_total")


def test_a_consumer_that_stops_reading_still_stops_its_request_at_the_deadline():
    model = served_llama()
    model.config.max_position_embeddings = 4096  # room for a generation far longer than the deadline
    limits = Limits(request_timeout=0.5)
    engine = Engine(Backbone(model, max_adapters=1, max_rank=4), tiny_tokenizer(), base_name="tiny", limits=limits)
    engine.start()
    before, max_tokens = _generated(engine), 4000
    try:

        async def run() -> None:
            body = CompletionRequest(
                model="tiny", prompt=[5, 6, 7], max_tokens=max_tokens, temperature=0, ignore_eos=True
            )
            events = generate(engine, None, body, "here")
            await anext(events)  # Start
            await anext(events)  # a first token; then nothing is read (a client that stopped reading)
            deadline = time.monotonic() + 30
            while engine.running_rows() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the loop runs: the deadline's callback can fire
            assert not engine.running_rows(), "the request still ran 30 s after its 0.5 s deadline"
            await events.aclose()

        asyncio.run(run())
        assert engine.running_rows() == 0 and engine.queue_depth() == 0
        generated = _generated(engine) - before
        assert generated < max_tokens, "the request ran to max_tokens although its deadline passed"
    finally:
        engine.stop()


def test_listings_survive_adapter_churn(dirs):
    engine = _engine(dirs, slots=2, adapters=()).start()
    backend = LocalBackend(engine)
    stop, errors = threading.Event(), []

    def churn():
        names = ["a0", "a1", "a2", "a3"]
        k = 0
        while not stop.is_set():
            name = names[k % 4]
            try:
                engine.add_adapter(name, str(dirs[name]))
                if k % 3 == 0:
                    engine.remove_adapter(names[(k + 1) % 4], timeout=0)
            except LookupError:
                pass  # deleted by the other branch already: a 404, not a fault
            except Exception as error:
                errors.append(error)
            k += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        deadline = time.monotonic() + 3
        reads = 0
        while time.monotonic() < deadline:
            asyncio.run(backend.adapters())
            engine.metrics.render()
            reads += 1
        assert reads > 10
    finally:
        stop.set()
        worker.join(30)
        engine.stop()
    assert not errors, errors


def test_a_reload_from_changed_files_gets_its_own_prefix_cache_version(dirs, offline, tmp_path):
    x, y = tmp_path / "x", tmp_path / "y"
    shutil.copytree(dirs["a0"], x)
    shutil.copytree(dirs["a0"], y)
    engine = _engine(dirs, slots=2, adapters=()).start()
    system = "You are a careful assistant. Answer: "  # two full blocks

    def ask(name: str) -> tuple[str, int]:
        hits = engine.kv.blocks.hits
        return _submit(engine, name, _ids(offline, system + "hi")).wait().text, engine.kv.blocks.hits - hits

    try:
        engine.add_adapter("x", str(x))
        engine.add_adapter("y", str(y))
        assert ask("y") == (offline.complete("a0", system + "hi", 8, ignore_eos=True), 0)  # y's blocks cached
        for file in x.iterdir():  # x retrained in place while evicted
            shutil.copy(dirs["a3"] / file.name, file)
        engine.add_adapter("p", str(dirs["a1"]))
        engine.add_adapter("q", str(dirs["a2"]))
        assert ask("x") == (offline.complete("a3", system + "hi", 8, ignore_eos=True), 0)  # never y's blocks
        assert engine.listing()["x"][1] != engine.listing()["y"][1]
    finally:
        engine.stop()


def test_cancelled_requests_leave_the_queue_and_their_keys_share(dirs):
    engine = _engine(dirs, adapters=(), limits=Limits(max_queue=2))  # not started: nothing drains
    abandoned = engine.submit_many(None, [[5, 6], [7, 8]], GREEDY, lambda k, e: None, "A")
    engine.cancel(abandoned)  # their client went away
    assert engine.queue_depth() == 0
    _submit(engine, None, [5, 6], tenant="A")  # A's retry is not refused for its own ghosts
    engine.stop()


def test_the_queue_overshoots_by_at_most_one_request_per_newcomer_key():
    queue = FairQueue(8, 100)

    class Waiting:
        def __init__(self, tenant, cost):
            self.tenant, self.cost, self.submitted = tenant, cost, 0.0

    for _ in range(8):
        queue.check("A", 1, 10, 1)
        queue.add(Waiting("A", 10))
    for key in "BCDEFGH":
        with pytest.raises(Overloaded):  # full: a newcomer gets one request in, not its whole share
            queue.check(key, 2, 10, 1)
        with pytest.raises(Overloaded):  # nor more than its share of the tokens
            queue.check(key, 1, 60, 1)
        queue.check(key, 1, 10, 1)
        queue.add(Waiting(key, 10))
    assert len(queue) == 8 + 7 and queue.tokens <= 100 + 7 * 10


def test_a_failing_row_does_not_change_another_requests_seeded_text(dirs, tmp_path):
    def blow(tensors):  # finite weights whose logits overflow to NaN: sampling that row raises
        for key in list(tensors):
            if "lora_B" in key and ("q_proj" in key or "k_proj" in key):
                tensors[key] = tensors[key] * 1e30 + 1e30

    engine = _engine(dirs, adapters=("a1",))
    engine.add_adapter("nan", str(broken_copy(dirs["a0"], tmp_path / "nan", tensors=blow)))
    seeded = Sampling(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = _submit(engine, "a1", [5, 6, 7], seeded, "A")
    engine.start()
    try:
        alone.wait()
        with engine._lock:  # queued together, so that they share their steps
            beside = _submit(engine, "a1", [5, 6, 7], seeded, "A")
            failing = _submit(engine, "nan", [5, 6, 7], Sampling(max_tokens=12, temperature=1.0), "A")  # after it
        assert isinstance(failing.wait().end, Failed)
        assert beside.wait().text == alone.text
    finally:
        engine.stop()


def test_a_reload_finishing_after_its_adapter_was_deleted_is_unloaded(dirs, monkeypatch):
    engine = _engine(dirs, slots=2, adapters=("a0", "a1", "a2"))  # a0 evicted by a1 and a2
    backbone, load = engine.backbone, engine.backbone.load
    started = threading.Event()

    def slow_load(*args, **kwargs):  # a slow disk: the delete comes while the reload runs
        started.set()
        time.sleep(1.0)
        return load(*args, **kwargs)

    monkeypatch.setattr(backbone, "load", slow_load)
    engine.start()
    try:
        request = engine.submit("a0", [5, 6], GREEDY, lambda e: None)
        assert started.wait(30)
        engine.cancel([request])
        engine.remove_adapter("a0", timeout=0)
        deadline = time.monotonic() + 30
        while engine._loading and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(name.startswith("a0#") for name in backbone.names), backbone.names
    finally:
        engine.stop()
