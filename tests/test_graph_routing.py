"""Routing buffers (`Backbone.routing_buffers`, `use(names, buffers=...)`): fixed routing tensors that each
block rewrites in place, so that a CUDA graph captured in one block replays another block's routing.

On the CPU: blocks with buffers give exactly the outputs of plain blocks, mixed routing after mixed
routing (LoRA, a "cat" composition, IA3, bottleneck, a modules_to_save head, the base), the tensors
never move, and refusals leave the slot table, the pins and the buffers as they were. On a GPU: a
captured decode step of a tiny Llama replays new routings as eager forwards compute them, and an
eager forward over buffers (LoRA, IA3, a head) makes no host sync.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import LLAMA_TARGETS, VOCAB, ids, tiny_llama
from torch import nn

import adapterhub as ah
from adapterhub.plugins import get_type

CAT = {"adapters": [{"name": "lora_a", "weight": 0.7}, {"name": "lora_b", "weight": -0.4}], "method": "cat"}
ROUTINGS = [  # four rows each: every type, compositions, the base, one type alone, one name for all
    [None, "lora_a", "ia3", "seq_bn"],
    [CAT, "lora_head", None, "ia3"],
    ["seq_bn", CAT, CAT, "lora_a"],
    ["lora_a", "lora_head", "lora_a", "lora_b"],
    [None, None, None, None],
    "lora_b",
]


def randomized(adapter: ah.Adapter, seed: int, keys=lambda key: True) -> ah.Adapter:
    """`adapter` (a type's fresh init, often the identity) with noise on its weights, so none hides a mistake."""
    g = torch.Generator().manual_seed(seed)
    for parts in adapter.modules.values():
        for key, t in parts.items():
            if keys(key) and t.is_floating_point() and t.dim() > 0:
                t.copy_(t + torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) * 0.3)
    return adapter


def backbone(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ah.Backbone]:
    """A tiny Llama with three LoRA adapters (one with its own lm_head), an IA3 adapter scaling inputs
    and outputs, and a bottleneck adapter, all with random weights."""
    model = tiny_llama().to(device, dtype)
    bb = ah.Backbone(model, max_adapters=8, max_rank=8)
    lora, ia3, bottleneck = get_type("lora"), get_type("ia3"), get_type("bottleneck")
    bb.add("lora_a", randomized(lora.init(model, {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_TARGETS}), 1))
    head = randomized(lora.init(model, {"r": 2, "lora_alpha": 2, "target_modules": ["o_proj"]}), 5)
    head.modules_to_save["lm_head"] = {"weight": torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(5))}
    bb.add("lora_head", head)
    bb.add("lora_b", randomized(lora.init(model, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}), 2))
    config = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    bb.add("ia3", randomized(ia3.init(model, config), 3))
    bb.add("seq_bn", randomized(bottleneck.init(model, {"config": "seq_bn"}), 4, lambda key: "adapter_" in key))
    return model, bb


def logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch, use_cache=False).logits


def addresses(buffers: ah.RoutingBuffers) -> list[int]:
    tensors = [buffers.index, buffers.weight]
    tensors += [t for r in buffers.routes.values() for t in (r.index, r.weight) if t is not None]
    return [t.data_ptr() for t in tensors]


def state(bb: ah.Backbone, buffers: ah.RoutingBuffers) -> tuple:
    """What a refused block must leave as it was."""
    return dict(bb.table.in_flight), bb.pinned_count(), buffers.index.clone(), buffers.weight.clone()


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[:2] == after[:2]
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])


@pytest.fixture(scope="module")
def tiny():
    return backbone()


@pytest.mark.parametrize("length", [1, 5])  # a decode step (one token per row) and a prefill
def test_buffers_route_as_plain_blocks(tiny, length):
    model, bb = tiny
    buffers = bb.routing_buffers(4, columns=2)
    assert set(buffers.routes) == {"lora", "ia3", "bottleneck", "*"}
    assert buffers.routes["lora"].index.shape == (4, 2) and buffers.routes["ia3"].index.shape == (4,)
    where = addresses(buffers)
    batch = ids(batch=4, length=length)
    for names in ROUTINGS + ROUTINGS[:2]:  # back to earlier routings: nothing stale is reused
        with bb.use(names, buffers=buffers):
            assert bb.routing.routes == buffers.routes  # every type routed, whatever the batch mixes
            got = logits(model, batch)
        with bb.use(names):
            want = logits(model, batch)
        assert torch.equal(got, want), names
        assert addresses(buffers) == where
    with bb.use(None):
        base = logits(model, batch)
    with bb.use(ROUTINGS[0], buffers=buffers):
        assert not torch.allclose(logits(model, batch)[1:], base[1:], atol=1e-3)  # the adapters do something
    assert bb.table.in_flight == {} and bb.routing.routes == {}


def test_repeat_and_unused_routes(tiny):
    """repeat=k fills k rows per name; a type absent from the batch reads -1 in every row."""
    model, bb = tiny
    buffers = bb.routing_buffers(4, columns=2)
    batch = ids(batch=4, length=3)
    with bb.use(["ia3", CAT], repeat=2, buffers=buffers):
        got = logits(model, batch)
        assert buffers.routes["bottleneck"].index.tolist() == [-1] * 4
        a, b, ia3 = (bb.info(name).slot for name in ("lora_a", "lora_b", "ia3"))
        assert buffers.routes["lora"].index.tolist() == [[-1, -1], [-1, -1], [a, b], [a, b]]
        assert torch.equal(buffers.routes["lora"].weight[2:], torch.tensor([[0.7, -0.4]] * 2))
        assert buffers.routes["*"].index.tolist() == [ia3, ia3, -1, -1]  # heads see a composition as the base
    with bb.use(["ia3", CAT], repeat=2):
        assert torch.equal(got, logits(model, batch))


def refused(bb: ah.Backbone, buffers: ah.RoutingBuffers, names, match: str, **kw) -> None:
    before = state(bb, buffers)
    with pytest.raises(ah.AdapterError, match=match), bb.use(names, buffers=buffers, **kw):
        pytest.fail("the block ran")
    assert_same_state(before, state(bb, buffers))
    assert bb.routing.routes == {}


def test_refusals_leave_everything_as_it_was(tiny):
    bb = tiny[1]
    bb.pin("lora_b")
    try:
        buffers = bb.routing_buffers(4, columns=1)
        with bb.use(ROUTINGS[0], buffers=buffers):  # buffers holding a routing, which refusals keep
            pass
        refused(bb, buffers, ["lora_a", None, "ia3"], r"route 4 rows, but Backbone.use got 3 .* routing_buffers\(3\)")
        refused(bb, buffers, ["lora_a", "ia3"], r"got 6 .*routing_buffers\(6\)", repeat=3)
        refused(bb, buffers, ["lora_a", None, "ia3", None], "packed batches without buffers", lengths=[1, 2, 1, 1])
        refused(bb, buffers, ["ia3", CAT, None, "lora_b"], r"composes 2 lora .*routing_buffers\(rows, columns=2\)")
        other = backbone()[1].routing_buffers(4)
        refused(bb, other, [None] * 4, "made by another Backbone")
        assert bb.pinned_count() == 1
    finally:
        bb.unpin("lora_b")


def test_refused_after_adapters_the_buffers_were_made_without():
    """A type, a feature (DoRA, IA3's input scales) or modules that came after the buffers: the batch is
    refused (a graph captured with them would miss those hooks) until new buffers are made; prompt
    tuning always."""
    model = tiny_llama()
    bb = ah.Backbone(model, max_adapters=8, max_rank=8)
    ia3, lora = get_type("ia3"), get_type("lora")
    bb.add("lora_a", randomized(lora.init(model, {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_TARGETS}), 1))
    bb.add("lora_b", randomized(lora.init(model, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}), 2))
    buffers = bb.routing_buffers(2, columns=2)
    assert set(buffers.routes) == {"lora", "*"}
    bb.add("ia3", randomized(ia3.init(model, {"target_modules": ["k_proj", "v_proj"]}), 3))
    refused(bb, buffers, ["ia3", None], r"no ia3 route .*routing_buffers\(\) now that it is loaded")
    dora = randomized(lora.init(model, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}), 6)
    dora.config["use_dora"] = True
    for path, parts in dora.modules.items():
        parts["magnitude"] = torch.rand(model.get_submodule(path).weight.size(0)) + 0.5
    bb.add("dora", dora)
    refused(bb, buffers, ["dora", "lora_a"], r"lora adapters need \['dora'\].*make new buffers")

    buffers = bb.routing_buffers(2, columns=2)  # made now: these route them all
    batch = ids(batch=2, length=4)
    for names in (["dora", "ia3"], [CAT, "ia3"], ["lora_b", None], [None, "dora"]):
        with bb.use(names, buffers=buffers):
            got = logits(model, batch)
        with bb.use(names):
            assert torch.equal(got, logits(model, batch)), names

    config = {"target_modules": ["k_proj"], "feedforward_modules": ["k_proj"]}  # scales k_proj's input
    bb.add("ia3_in", randomized(ia3.init(model, config), 7))
    refused(bb, buffers, ["ia3_in", None], r"ia3 adapters need \['input'\]")
    bb.add("ia3_o", randomized(ia3.init(model, {"target_modules": ["o_proj"]}), 8))  # IA3 slots on o_proj
    refused(bb, buffers, [None, "lora_a"], "ia3 slots went onto more modules .* capture again")
    buffers = bb.routing_buffers(2)
    bb.add("prompt", get_type("prompt_tuning").init(model, {"num_virtual_tokens": 2}))
    with bb.use(["lora_a", None], buffers=buffers):  # prompt tuning is no route of buffers: nothing to refuse
        pass
    refused(bb, buffers, ["prompt", None], "prompt_tuning adapter, which cannot run with routing buffers")
    assert set(bb.routing_buffers(2).routes) == {"lora", "ia3", "*"}


def test_heads_added_later_are_refused():
    model, bb = backbone()
    buffers = bb.routing_buffers(2)
    adapter = get_type("ia3").init(model, {"target_modules": ["k_proj"]})
    adapter.modules_to_save["model.layers.0.mlp.up_proj"] = {"weight": torch.randn(64, 32)}
    bb.add("ia3_head", adapter)
    refused(bb, buffers, ["lora_a", None], "modules_to_save heads went onto more modules")


def test_the_guide_runs():
    """docs/cuda-graphs.md's example, as it is (eager on the CPU; it captures and replays on a GPU)."""
    page = (Path(__file__).parent.parent / "docs" / "cuda-graphs.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    exec(compile(code, "docs/cuda-graphs.md", "exec"), {"__name__": "guide"})


# ---- on a GPU ------------------------------------------------------------------------------------


def _cuda_build() -> bool:
    if ah.backend() != "compiled" or not torch.cuda.is_available():
        return False
    from adapterhub import _C

    return bool(_C.with_cuda)


# The compiled CUDA ops read the index on the device and never sync (eagerly or under capture); the
# PyTorch fallback groups rows on the host (a sync), so a GPU without the CUDA build cannot capture.
needs_cuda_build = pytest.mark.skipif(not _cuda_build(), reason="needs an NVIDIA GPU and adapterhub._C built with CUDA")
GPU_ROUTINGS = [  # eight rows each
    [None, "lora_a", "ia3", "seq_bn", CAT, "lora_b", "lora_head", "lora_a"],
    ["seq_bn"] * 8,
    [CAT, CAT, None, "ia3", "ia3", "lora_b", "seq_bn", None],
    [None] * 8,
    ["lora_a", "ia3", "lora_head", CAT, "seq_bn", "lora_a", "ia3", CAT],
]


@pytest.mark.cuda
@needs_cuda_build
@pytest.mark.parametrize("length", [1, 4])  # a decode step; a prefill-shaped step (rows != batch rows)
def test_captured_step_replays_new_routings(length):
    model, bb = backbone("cuda")
    buffers = bb.routing_buffers(8, columns=2)
    batch = ids(batch=8, length=length).cuda()  # the graph's static input
    graph = torch.cuda.CUDAGraph()
    with bb.use(GPU_ROUTINGS[0], buffers=buffers), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy inits, allocator)
            for _ in range(2):
                model(input_ids=batch, use_cache=False)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            static = model(input_ids=batch, use_cache=False).logits
    for names in GPU_ROUTINGS[1:] + GPU_ROUTINGS[:1]:
        with bb.use(names, buffers=buffers):
            graph.replay()
            got = static.clone()  # ordered after the replay on this stream
            torch.cuda.synchronize()  # the slots stay acquired until the replay has read them
        with bb.use(names):
            want = logits(model, batch)
        # fp32; the same lora kernels in the graph and eagerly, but SDPA may pick another kernel under capture
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=str(names))


class Plain(nn.Module):
    """Two linears and a head, nothing else: so that the forward's syncs, if any, are the routing's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(x))))


def plain_backbone(device: str) -> tuple[nn.Module, ah.Backbone]:
    """`Plain` with a LoRA adapter on both linears and an IA3 adapter with a modules_to_save head."""
    model = Plain().to(device).eval()
    bb = ah.Backbone(model, max_adapters=4, target_modules=["up", "down"], preallocate=())
    lora = get_type("lora").init(model, {"r": 4, "lora_alpha": 8, "target_modules": ["up", "down"]})
    bb.add("lora", randomized(lora, 2))
    config = {"target_modules": ["up", "down"], "feedforward_modules": ["down"]}
    adapter = randomized(get_type("ia3").init(model, config), 1)
    adapter.modules_to_save["head"] = {"weight": torch.randn(4, 16), "bias": torch.randn(4)}
    bb.add("ia3", adapter)
    return model, bb


@pytest.mark.cuda
@needs_cuda_build
def test_eager_forward_over_buffers_makes_no_host_sync():
    """LoRA (the compiled CUDA ops check routing values on the device), IA3 (input and output scales)
    and a modules_to_save head, routed from buffers: no host sync in an eager forward."""
    model, bb = plain_backbone("cuda")
    buffers = bb.routing_buffers(4)
    x = torch.randn(4, 3, 16, device="cuda")
    names = ["ia3", "lora", None, "ia3"]
    with bb.use(names, buffers=buffers), torch.no_grad():
        model(x)  # the first op call on the device sets up its error sink
        torch.cuda.synchronize()
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = model(x)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    with bb.use(names), torch.no_grad():
        assert torch.equal(got, model(x))
