"""Runtime behaviour: generation, torch.compile without recompiles, threads, LRU, pins, host cache."""

import threading

import pytest
import torch

import adapterhub as ah
from tiny_models import LLAMA_TARGETS, ids, save_peft_adapter, tiny_llama


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [save_peft_adapter(tiny_llama, root / f"a{seed}", seed=seed, r=8, lora_alpha=16,
                              target_modules=LLAMA_TARGETS) for seed in range(1, 7)]


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
    with bb.use(names), torch.no_grad():
        mixed = model.generate(prompt, **kw)
    for row, name in enumerate(names):
        with bb.use(name), torch.no_grad():
            single = model.generate(prompt[row:row + 1], **{**kw, "attention_mask": torch.ones_like(prompt[row:row + 1])})
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


def test_lru_eviction_pins_and_host_cache(adapters, caplog, tmp_path):
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
    # a is evicted next and kept in the host cache: reloading it must not touch the disk
    moved = tmp_path / "moved"
    adapters[0].rename(moved)
    try:
        bb.load(adapters[3], name="d")
        assert "a" not in bb.names and len(bb.host_cache) == 2
        bb.load(adapters[0], name="a")  # the directory is gone; only the host cache has it
    finally:
        moved.rename(adapters[0])
    with bb.use("a"):
        torch.testing.assert_close(logits(model, batch), a_out)


def test_all_slots_pinned_or_in_flight_refuses_to_load(adapters):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    bb.load(adapters[0], name="a")
    bb.load(adapters[1], name="b")
    bb.pin("a")
    with bb.use("b"):
        with pytest.raises(ah.AdapterError, match="pinned or in use"):
            bb.load(adapters[2], name="c")
    assert sorted(bb.names) == ["a", "b"]


def test_info_and_unload(adapters):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    bb.load(adapters[0], name="a")
    info = bb.info("a")
    assert (info.rank, info.modules, info.pinned, info.use_dora) == (8, 14, False, False)
    assert info.nbytes == sum(8 * (i + o) * 4 for i, o in [(32, 32), (32, 16), (32, 16), (32, 32),
                                                            (32, 64), (32, 64), (64, 32)]) * 2
    bb.unload("a")
    assert bb.names == []
