"""Training adapters in their Backbone slots: gradients equal PEFT's, reach only the row's own
slot, and the training forward computes what inference computes."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, PromptTuningConfig, VeraConfig
from tiny_models import LLAMA_TARGETS, ids, save_peft, tiny_bert_cls, tiny_gpt2, tiny_llama

import adapterhub as ah
from adapterhub.formats import read_peft_lora

CASES = {
    "lora-llama": (tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)),
    "lora-gpt2-conv1d": (
        tiny_gpt2,
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    ),
    "lora-bert-head": (
        tiny_bert_cls,
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
    "ia3-llama": (
        tiny_llama,
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "prompt-llama": (tiny_llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    # outside plugins (plugins/): trainable with no training code of their own
    "loha-plugin": (tiny_llama, LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "vera-plugin": (tiny_llama, VeraConfig(r=4, target_modules=["q_proj", "v_proj"])),
}


def _loss(logits: torch.Tensor, length: int) -> torch.Tensor:
    """A loss of every output that depends on all parameters (the last `length` positions: the tokens)."""
    if logits.dim() == 3:
        logits = logits[:, -length:]
    return (logits**2).mean()


def _peft_key(name: str) -> str:
    """Our "module path.tensor" name -> the name of PEFT's parameter."""
    if name == "prompt_embeddings":
        return "prompt_encoder.default.embedding.weight"
    path, key = name.rsplit(".", 1)
    if key in ("A", "B"):
        return f"base_model.model.{path}.lora_{key}.default.weight"
    if key.startswith(("ia3_", "hada_", "vera_")):
        return f"base_model.model.{path}.{key}.default"
    return f"base_model.model.{path}.modules_to_save.default.{key}"  # a modules_to_save head


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_equal_peft(case, tmp_path):
    build, config = CASES[case]
    directory = save_peft(build, tmp_path / "a", 1, config)
    model = build()
    bb = ah.Backbone(model, max_adapters=3, max_rank=8, preallocate=())
    bb.load(directory, name="a")
    x = ids(2, 9)
    with bb.training("a") as trainable, bb.use("a"):
        _loss(model(x).logits, 9).backward()
        ours = {k: p.grad for k, p in trainable.named_parameters("a").items()}

    prompt = isinstance(config, PromptTuningConfig)  # PEFT refuses is_trainable for loaded prompts
    peft = PeftModel.from_pretrained(build(), directory, is_trainable=not prompt).eval()
    if prompt:
        peft.prompt_encoder.requires_grad_(True)
    _loss(peft(input_ids=x).logits, 9).backward()
    theirs = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
    assert sorted(_peft_key(k) for k in ours) == sorted(theirs)
    for name, grad in ours.items():
        expected = theirs[_peft_key(name)]
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad.view_as(expected), expected, rtol=1e-4, atol=1e-6, msg=name)


def _two_adapters(tmp_path, build, config):
    model = build()
    bb = ah.Backbone(model, max_adapters=4, max_rank=8, preallocate=())
    for seed, name in ((1, "a"), (2, "b")):
        bb.load(save_peft(build, tmp_path / name, seed, config), name=name)
    return model, bb


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_gradient_leaks_between_slots(case, tmp_path):
    """A batch of rows [a, b, base]: the loss of row 0 reaches a only; a's gradients equal those of
    training a alone on that row; then b's row reaches b only."""
    build, config = CASES[case]
    model, bb = _two_adapters(tmp_path, build, config)
    x = ids(3, 9)
    with bb.training(["a", "b"]) as trainable:
        with bb.use("a"):
            _loss(model(x[:1]).logits, 9).backward()
        alone = {k: p.grad.clone() for k, p in trainable.named_parameters("a").items()}
        for row, owner, other in ((0, "a", "b"), (1, "b", "a")):
            for p in trainable.parameters():
                p.grad = None
            with bb.use(["a", "b", None]):
                _loss(model(x).logits[row : row + 1], 9).backward()
            assert all(p.grad is None or not p.grad.any() for p in trainable.parameters(other)), other
            assert all(p.grad is not None and p.grad.any() for p in trainable.parameters(owner)), owner
        for p in trainable.parameters():
            p.grad = None
        with bb.use(["a", "b", None]):
            _loss(model(x).logits[:1], 9).backward()
        for key, p in trainable.named_parameters("a").items():
            torch.testing.assert_close(p.grad, alone[key], rtol=1e-4, atol=1e-7, msg=key)


def _bottleneck_backbone(tmp_path, build):
    model = build()
    bb = ah.Backbone(model, max_adapters=3, max_rank=8, preallocate=())
    bb.create("a", "bottleneck", {"config": {"reduction_factor": 8, "init_weights": "bert"}})
    return model, bb


def _float64(build):
    """build() in float64 throughout: Llama's RMSNorm computes in float32 even for a float64 model,
    which would drown finite differences in round-off, so its norms get the same formula in float64."""
    model = build().double()
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = lambda h, m=module: (
                m.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
            )
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert_cls], ids=["llama", "bert"])
def test_bottleneck_gradients_match_finite_differences(build, tmp_path):
    """No reference library trains adapters' bottlenecks next to ours here, so: float64 central
    differences of the loss against the analytic gradient, on entries of every tensor."""
    model, bb = _bottleneck_backbone(tmp_path, lambda: _float64(build))
    x = ids(2, 6)
    with bb.training("a") as trainable, bb.use(["a", None]):
        params = trainable.named_parameters("a")
        with torch.no_grad():
            for p in params.values():
                p.normal_(0, 0.5)
        _loss(model(x).logits, 6).backward()
        g = torch.Generator().manual_seed(0)
        for name, p in params.items():
            for flat in torch.randint(0, p.numel(), (2,), generator=g).tolist():
                values = []
                for sign in (1, -1):
                    with torch.no_grad():
                        p.view(-1)[flat] += sign * 1e-6
                        values.append(_loss(model(x).logits, 6).item())
                        p.view(-1)[flat] -= sign * 1e-6
                numeric = (values[0] - values[1]) / 2e-6
                assert p.grad.view(-1)[flat].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9), name


@pytest.mark.parametrize("case", sorted(CASES) + ["bottleneck"])
def test_training_forward_equals_inference(case, tmp_path):
    """The recording forward (clones, differentiable paths) gives the outputs of the inference one."""
    if case == "bottleneck":
        model, bb = _bottleneck_backbone(tmp_path, tiny_llama)
        names = ["a", None]
    else:
        model, bb = _two_adapters(tmp_path, *CASES[case])
        names = ["a", "b", None]
    x = ids(len(names), 8)
    with torch.no_grad(), bb.use(names):
        expected = model(x).logits
    with bb.training([n for n in names if n]), bb.use(names):
        got = model(x).logits
        assert got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_trained_weights_stay_in_the_slot_and_save_for_peft(tmp_path):
    """After training, the slot serves the trained weights, and PEFT loads what `save` writes; inside
    the block, `save` writes the parameters of the last step, which the slots see at the next forward."""
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    bb.create("a", "lora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    x = ids(2, 9)
    with bb.training("a") as trainable:
        optimizer = torch.optim.SGD(trainable.parameters(), lr=0.5)
        for _ in range(3):
            with bb.use("a"):
                model(x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        bb.save("a", tmp_path / "inside")  # no forward since the last step: the slots lag one step behind
        current = trainable.adapter("a")
        with torch.no_grad(), bb.use("a"):
            during = model(x).logits  # an evaluation forward inside the block sees the updates
    with torch.no_grad(), bb.use("a"):
        after = model(x).logits
    torch.testing.assert_close(during, after)
    with torch.no_grad():
        assert not torch.allclose(after, model(x).logits)  # B moved away from zero
    assert bb.info("a").pinned is False
    inside = read_peft_lora(tmp_path / "inside")  # save() inside the block wrote the stepped parameters
    for path, parts in current.modules.items():
        assert torch.equal(inside.modules[path]["A"], parts["A"]) and torch.equal(inside.modules[path]["B"], parts["B"])
    bb.save("a", tmp_path / "saved")
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=x).logits, after, rtol=1e-5, atol=1e-6)


def test_a_load_during_a_training_forward_waits_instead_of_writing_into_the_clones(tmp_path):
    """A recording forward swaps slot tensors for clones; a load from another thread then must not
    write into them (its weights would vanish when the originals are put back)."""
    directory = save_peft(tiny_llama, tmp_path / "b", 2, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    bb.create("a", "lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    inside, proceed, loaded = threading.Event(), threading.Event(), threading.Event()

    def pause(module, args, output):
        if torch.is_grad_enabled():
            inside.set()
            proceed.wait(30)

    loader = threading.Thread(target=lambda: (inside.wait(30), bb.load(directory, name="b"), loaded.set()))
    loader.start()
    hook = model.model.layers[1].register_forward_hook(pause)
    x = ids(2, 9)
    failures = []

    def train_step():
        try:
            model(x, labels=x).loss.backward()  # the backward runs after the load: it must not see its writes
        except Exception as error:
            failures.append(error)

    with bb.training("a"), bb.use("a"):
        forward = threading.Thread(target=train_step)
        forward.start()
        assert inside.wait(30)
        assert not loaded.wait(0.5), "the load wrote while the training forward held clones"
        proceed.set()
        forward.join(30)
    hook.remove()
    loader.join(30)
    assert loaded.is_set() and failures == []
    alone = ah.Backbone(tiny_llama(), max_adapters=1, max_rank=8)
    alone.load(directory, name="b")
    with torch.no_grad(), bb.use("b"):
        got = model(x).logits
    with torch.no_grad(), alone.use("b"):
        torch.testing.assert_close(got, alone.model(x).logits)


def test_a_load_between_a_training_forward_and_its_backward_waits_for_the_backward(tmp_path):
    """Autograd keeps the slot tensors the forward read (every module's, adapted or not); a load
    writing them before the backward would make it fail."""
    directory = save_peft(tiny_llama, tmp_path / "b", 2, LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    bb.create("a", "lora", {"r": 4, "target_modules": ["q_proj"]})
    x, loaded = ids(2, 9), threading.Event()
    with bb.training("a"):
        with bb.use("a"):
            loss = model(x, labels=x).loss
        loader = threading.Thread(target=lambda: (bb.load(directory, name="b"), loaded.set()))
        loader.start()
        assert not loaded.wait(0.5), "the load did not wait for the step's backward"
        loss.backward()
        assert loaded.wait(30)
    loader.join(30)
    assert sorted(bb.names) == ["a", "b"]


def test_an_adapter_in_training_stays_pinned_and_is_not_swapped_unloaded_or_trained_twice(tmp_path):
    bb = ah.Backbone(tiny_llama(), max_adapters=1, max_rank=8)
    bb.create("a", "lora", {"r": 4, "target_modules": ["q_proj"]})
    with bb.training("a"):
        for call, message in (
            (lambda: bb.unpin("a"), "stays pinned while a training"),
            (lambda: bb.unload("a"), "cannot unload 'a' while a training"),
            (lambda: bb.swap("a", tmp_path), "cannot swap 'a' while a training"),
            (lambda: bb.training(["a"]).__enter__(), "already being trained"),
        ):
            with pytest.raises(ah.AdapterError, match=message):
                call()
        with pytest.raises(ah.NoFreeSlot):  # the only slot is pinned by training
            bb.create("b", "lora", {"r": 4, "target_modules": ["q_proj"]})
    assert bb.names == ["a"] and not bb.info("a").pinned
    bb.unload("a")
    assert bb.names == []


def test_dora_refuses_training(tmp_path):
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=2, max_rank=8)
    bb.load(
        save_peft(tiny_llama, tmp_path / "d", 1, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)), name="d"
    )
    with pytest.raises(ah.AdapterError, match="DoRA adapters cannot be trained"), bb.training("d"):
        pass
    assert bb.info("d").pinned is False
