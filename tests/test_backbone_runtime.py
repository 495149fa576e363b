"""Runtime behaviour: generation, torch.compile without recompiles, threads, LRU, pins, host cache."""

import shutil
import sys
import threading

import pytest
import torch
from tiny_models import LLAMA_TARGETS, ids, save_peft_adapter, tiny_llama

import adapterhub as ah


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [
        save_peft_adapter(tiny_llama, root / f"a{seed}", seed=seed, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
        for seed in range(1, 7)
    ]


def logits(model, batch):
    with torch.no_grad():
        return model(batch).logits


def test_generate_with_beams_keeps_each_rows_adapter(adapters):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=4, max_rank=8)
    a, b = bb.load(adapters[0], name="a"), bb.load(adapters[1], name="b")
    prompt = ids(batch=3, length=5)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    names = [a, None, b]
    with bb.use(names, repeat=3), torch.no_grad():  # generate() expands each row num_beams times
        mixed = model.generate(prompt, **kw)
    for row, name in enumerate(names):
        with bb.use(name), torch.no_grad():
            single = model.generate(
                prompt[row : row + 1], **{**kw, "attention_mask": torch.ones_like(prompt[row : row + 1])}
            )
        assert torch.equal(mixed[row], single[0])
    with bb.use(a), torch.no_grad():
        with_a = model.generate(prompt, **kw)
    assert not torch.equal(with_a, model.generate(prompt, **kw)), "the adapter must change the generation"


def test_compiled_model_never_recompiles_across_swaps_and_routing(adapters):
    torch._dynamo.reset()
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=3, max_rank=8)
    for i in range(3):
        bb.load(adapters[i], name=f"n{i}")
    compiled = torch.compile(model, fullgraph=True)
    batch = ids(batch=3)
    routings = [["n0", "n1", "n2"], ["n2", None, "n0"], ["n1", "n1", "n1"]]
    with bb.use(routings[0]), torch.no_grad():
        compiled(batch)  # first compile
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(100):
            if step % 10 == 5:
                bb.swap(f"n{step % 3}", adapters[3 + step % 3])
            names = routings[step % 3]
            with bb.use(names), torch.no_grad():
                got = compiled(batch).logits
            if step % 25 == 0:
                with bb.use(names):
                    torch.testing.assert_close(got, logits(model, batch), rtol=1e-4, atol=1e-5)


def test_swap_during_forward_in_another_thread_is_never_torn(adapters):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=3, max_rank=8)
    bb.load(adapters[0], name="x")
    batch = ids(batch=2)
    with bb.use("x"):
        old = logits(model, batch)
    bb.swap("x", adapters[1])
    with bb.use("x"):
        new = logits(model, batch)
    bb.swap("x", adapters[0])
    results, stop = [], threading.Event()

    def swapper():
        sources = [adapters[1], adapters[0]]
        i = 0
        while not stop.is_set():
            bb.swap("x", sources[i % 2])
            i += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(30):
            with bb.use("x"):
                results.append(logits(model, batch))
    finally:
        stop.set()
        thread.join()
    for got in results:
        assert torch.allclose(got, old, atol=1e-5) or torch.allclose(got, new, atol=1e-5)


OPENED: list[str] = []  # files opened by Python code, recorded by the audit hook below
sys.addaudithook(lambda event, args: OPENED.append(str(args[0])) if event == "open" and args else None)


def test_lru_eviction_pins_and_host_cache(adapters, caplog):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    batch = ids(batch=1)
    bb.load(adapters[0], name="a")
    with bb.use("a"):
        a_out = logits(model, batch)
    bb.load(adapters[1], name="b")
    bb.pin("a")
    with caplog.at_level("INFO", logger="adapterhub"):
        bb.load(adapters[2], name="c")  # evicts b: a is pinned
    assert "evicted adapter 'b'" in caplog.text
    assert sorted(bb.names) == ["a", "c"]
    bb.unpin("a")
    with bb.use("c"):
        pass  # c is now the most recently used
    bb.load(adapters[3], name="d")  # evicts a, into the host cache
    assert sorted(bb.names) == ["c", "d"] and len(bb.host_cache) == 2
    OPENED.clear()
    bb.load(adapters[0], name="a")  # from the host cache: its files are not read again
    assert not [f for f in OPENED if f.startswith(str(adapters[0]))], OPENED
    with bb.use("a"):
        torch.testing.assert_close(logits(model, batch), a_out)


def test_host_cache_never_serves_rewritten_files(adapters, tmp_path):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=1, max_rank=8)
    retrained = shutil.copytree(adapters[0], tmp_path / "retrained")
    bb.load(retrained, name="r")
    bb.load(adapters[1], name="other")  # evicts r into the host cache
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapters[2] / f, retrained / f)  # the adapter is retrained in place
    bb.load(retrained, name="r")
    batch = ids(batch=1)
    with bb.use("r"):
        got = logits(model, batch)
    bb.load(adapters[2], name="expected")
    with bb.use("expected"):
        torch.testing.assert_close(got, logits(model, batch))


def test_use_checks_names_against_the_batch(adapters):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    bb.load(adapters[0], name="a")
    with pytest.raises(ValueError, match=r"the batch has 4 rows but Backbone\.use routes 2"), bb.use(["a", None]):
        logits(model, ids(batch=4))
    with pytest.raises(ah.AdapterError, match="at least one name"):
        bb.use([]).__enter__()
    with bb.use("a"), pytest.raises(ah.AdapterError, match="do not nest"):
        bb.use(None).__enter__()
    with bb.use(["a", None]):  # the failed calls above left nothing acquired or routed
        logits(model, ids(batch=2))
    assert bb.routing.routes == {} and not bb.table.in_flight


def test_swap_of_a_name_unloaded_meanwhile_is_a_clear_error(adapters, monkeypatch):
    from adapterhub.types.lora import LoraType

    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    bb.load(adapters[0], name="x")
    real_read = LoraType.read

    def read_while_another_thread_unloads(self, directory, **kw):
        bb.unload("x")  # what another thread may do while this one reads the files
        return real_read(self, directory, **kw)

    monkeypatch.setattr(LoraType, "read", read_while_another_thread_unloads)
    with pytest.raises(ah.AdapterError, match="no adapter named 'x'"):
        bb.swap("x", adapters[1])
    assert bb.names == [] and len(bb.host_cache) == 1  # the adapter read is kept, not lost


def test_all_slots_pinned_or_in_flight_refuses_to_load(adapters):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    bb.load(adapters[0], name="a")
    bb.load(adapters[1], name="b")
    bb.pin("a")
    with bb.use("b"), pytest.raises(ah.AdapterError, match="pinned or in use"):
        bb.load(adapters[2], name="c")
    assert sorted(bb.names) == ["a", "b"]


def test_info_and_unload(adapters):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    bb.load(adapters[0], name="a")
    info = bb.info("a")
    assert (info.type, info.rank, info.modules, info.pinned) == ("lora", 8, 14, False)
    assert (
        info.nbytes
        == sum(8 * (i + o) * 4 for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]) * 2
        + 14 * 8
    )  # + fp64 scales
    bb.unload("a")
    assert bb.names == []
