"""Backbone.load on whatever files it is given: fuzzed adapter configs (any JSON value at any key,
deep nesting, wrong types, huge numbers, NaN) and fuzzed weight files (random bytes, garbled
safetensors headers and lengths, flipped and truncated files, odd dtypes and shapes, pickles) of
LoRA, IA3 and bottleneck adapters on a tiny Llama. The only exception allowed is AdapterError, and
a failed load leaves the adapters already loaded as they were. Then the config-reading faults by
name (too deep, unreadable, not JSON), and each adapter's content digest."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import IA3Config
from safetensors.torch import load, load_file, save, save_file
from tiny_models import save_peft, save_peft_adapter, tiny_llama

import adapterhub as ah
from adapterhub.errors import AdapterError
from adapterhub.formats import CONFIG_FILE, check_config, read_json_object
from adapterhub.formats.peft_lora import SCHEMA

WEIGHTS = {"lora": "adapter_model.safetensors", "ia3": "adapter_model.safetensors", "bottleneck": "adapter.safetensors"}
PICKLES = {"lora": "adapter_model.bin", "ia3": "adapter_model.bin", "bottleneck": "pytorch_adapter.bin"}
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
DEEP = '"__deep__"'


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    """One good adapter of each kind for the tiny Llama: kind -> directory."""
    root = tmp_path_factory.mktemp("seeds")
    bb = ah.Backbone(tiny_llama(), max_adapters=1, max_rank=8)
    bb.create("bottleneck", "bottleneck", {"config": "seq_bn"})
    bb.save("bottleneck", root / "bottleneck")
    return {
        "lora": save_peft_adapter(tiny_llama, root / "lora", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"]),
        "ia3": save_peft(
            tiny_llama,
            root / "ia3",
            2,
            IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        ),
        "bottleneck": root / "bottleneck",
    }


@pytest.fixture(scope="module")
def serving(seeds):
    """A backbone with one adapter resident, and a check that it still is, exactly as before."""
    bb = ah.Backbone(tiny_llama(), max_adapters=3, max_rank=8)
    bb.load(seeds["lora"], name="keep")
    before = bb.info("keep")

    def unchanged():
        assert bb.names == ["keep"]
        assert bb.info("keep") == before

    return bb, unchanged


def attempt(serving, directory: Path, **kwargs) -> bool:
    """Loads directory: True if it loaded (and is unloaded again), False on an AdapterError; any other
    exception fails the test. Either way the resident adapter is as it was."""
    bb, unchanged = serving
    try:
        bb.load(directory, name="fuzz", **kwargs)
    except AdapterError:
        unchanged()
        return False
    bb.unload("fuzz")
    unchanged()
    return True


# ---- configs ---------------------------------------------------------------------------------
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included
    | st.text(max_size=12)
    | st.sampled_from([0, -1, 1, 10**400, 2**63, 1e308, -0.0, "q_proj", "LORA", "IA3", "*", ".*", "["])
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def key_paths(config: dict) -> list[tuple[str, ...]]:
    """Every key of the config and of the objects right inside it (the bottleneck's "config")."""
    paths = [(k,) for k in config]
    paths += [(k, inner) for k, v in config.items() if isinstance(v, dict) for inner in v]
    return sorted(paths) + [("peft_type",), ("r",), ("target_modules",), ("modules_to_save",), ("config",)]


def edited(config: dict, path: tuple[str, ...], action: str, value) -> dict:
    """config with path set to value (action "set"), or removed ("delete")."""
    config = json.loads(json.dumps(config))
    node = config
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if action == "delete":
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return config


def deep(depth: int, brackets: str) -> str:
    opening, closing = ('{"a":', "}") if brackets == "{" else ("[", "]")
    return opening * depth + "1" + closing * depth


@st.composite
def config_texts(draw, config: dict) -> bytes:
    """A config file: the seed's config with 1-3 keys set to any JSON value, removed, or nested deep;
    or no JSON object at all (garbage bytes, a bare value, an integer too long to parse)."""
    whole = draw(st.sampled_from(["edits"] * 6 + ["garbage", "value", "long-int"]))
    if whole == "garbage":
        return draw(st.binary(max_size=64))
    if whole == "value":
        return json.dumps(draw(VALUES)).encode()
    if whole == "long-int":
        return json.dumps({**config, "r": "__long__"}).replace('"__long__"', "7" * 5000).encode()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(key_paths(config)) | st.tuples(st.text(max_size=6)))
        action = draw(st.sampled_from(["set", "set", "set", "delete", "deep"]))
        config = edited(config, path, action, "__deep__" if action == "deep" else draw(VALUES))
    text = json.dumps(config)
    if DEEP in text:
        depth = draw(st.sampled_from([40, 900, 3000, 100_000]) | st.integers(1, 1200))
        text = text.replace(DEEP, deep(depth, draw(st.sampled_from("[{"))), 1).replace(DEEP, "0")
    return text.encode()


@FUZZ
@given(data=st.data())
def test_fuzzed_configs_load_or_raise_adapter_error(seeds, serving, data):
    kind = data.draw(st.sampled_from(sorted(seeds)), label="kind")
    config = json.loads((seeds[kind] / CONFIG_FILE).read_text())
    text = data.draw(config_texts(config), label="config")
    type_name = data.draw(st.sampled_from([None, kind]), label="type")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "fuzz"
        shutil.copytree(seeds[kind], directory)
        (directory / CONFIG_FILE).write_bytes(text)
        attempt(serving, directory, type=type_name)


# ---- weight files ------------------------------------------------------------------------------
DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I8", "U8", "BOOL", "C64", "Q4", ""]


@st.composite
def header_files(draw, keys: list[str]) -> bytes:
    """A safetensors file whose JSON header names the real tensors (or others) with any dtype, shape
    and offsets, over a data section of any length."""
    header = {}
    for key in draw(st.lists(st.sampled_from(keys) | st.text(max_size=8), min_size=1, max_size=4, unique=True)):
        shape = draw(st.lists(st.integers(0, 40) | st.sampled_from([-1, 2**40, 2**63]), max_size=3))
        start = draw(st.integers(0, 64))
        header[key] = {
            "dtype": draw(st.sampled_from(DTYPES)),
            "shape": shape,
            "data_offsets": draw(st.sampled_from([[start, start + 4 * max(1, len(shape))], [0, 2**64 - 1], [8, 0]])),
        }
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"format": 1}, [], "x"]))
    text = json.dumps(header).encode()
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]  # garbled JSON
    length = draw(st.sampled_from([len(text)]) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + text + draw(st.binary(max_size=256))


TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


@st.composite
def tensor_files(draw, tensors: dict[str, torch.Tensor]) -> bytes:
    """A well-formed safetensors file of the seed's tensors, some of another dtype or shape, filled
    with NaN, inf or huge values, left out, or joined by a tensor under another name."""
    out = {}
    for key, tensor in tensors.items():
        change = draw(st.sampled_from(["keep", "keep", "dtype", "shape", "value", "drop"]))
        if change == "dtype":
            tensor = tensor.to(draw(st.sampled_from(TORCH_DTYPES)))
        elif change == "shape":
            tensor = torch.randn(draw(st.lists(st.integers(0, 40), max_size=3)))
        elif change == "value":
            tensor = tensor.clone().fill_(draw(st.sampled_from([float("nan"), float("inf"), -1e38, 0.0, 1e-45])))
        if change != "drop":
            out[key] = tensor.contiguous()
    if draw(st.booleans()) or not out:
        name = draw(st.sampled_from(sorted(tensors)) | st.text(min_size=1, max_size=8))
        out[name + draw(st.sampled_from(["", ".x", "_extra"]))] = torch.randn(
            draw(st.lists(st.integers(0, 8), max_size=2))
        )
    return save(out)


@st.composite
def weight_files(draw, original: bytes, keys: list[str]) -> bytes:
    mode = draw(st.sampled_from(["random", "header", "flip", "truncate", "length", "tensors", "tensors"]))
    if mode == "tensors":
        return draw(tensor_files(load(original)))
    if mode == "random":
        return draw(st.binary(max_size=96))
    if mode == "header":
        return draw(header_files(keys))
    if mode == "flip":
        data = bytearray(original)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if mode == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + original[8:]


PICKLED = st.sampled_from(
    [
        [1, 2],
        {"x": 1},
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32, dtype=torch.int64)},
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((4, 32), float("nan"))},
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32)},
        torch.ones(3),
    ]
)


@FUZZ
@given(data=st.data())
def test_fuzzed_weight_files_load_or_raise_adapter_error(seeds, serving, data):
    """The safetensors file garbled; or, with allow_pickle=True, only a pickle that torch.load
    (weights_only=True) reads as random bytes or as things that are not a dict of float tensors."""
    kind = data.draw(st.sampled_from(sorted(seeds)), label="kind")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "fuzz"
        shutil.copytree(seeds[kind], directory)
        weights = directory / WEIGHTS[kind]
        if data.draw(st.integers(0, 4), label="pickle instead") == 0:
            weights.unlink()
            if data.draw(st.booleans(), label="random bytes"):
                (directory / PICKLES[kind]).write_bytes(data.draw(st.binary(max_size=128)))
            else:
                torch.save(data.draw(PICKLED, label="object"), directory / PICKLES[kind])
            attempt(serving, directory, allow_pickle=True)
            return
        original = weights.read_bytes()
        weights.write_bytes(data.draw(weight_files(original, sorted(load_file(weights))), label="weights"))
        attempt(serving, directory, type=data.draw(st.sampled_from([None, kind]), label="type"))


def test_a_float8_adapter_is_checked_not_crashed_on(seeds, serving, tmp_path):
    """torch.isfinite has no float8_e4m3fn kernel: the finite check goes through float32."""
    tensors = {k: t.to(torch.float8_e4m3fn) for k, t in load_file(seeds["lora"] / WEIGHTS["lora"]).items()}
    shutil.copytree(seeds["lora"], tmp_path / "f8")
    save_file(tensors, tmp_path / "f8" / WEIGHTS["lora"])
    assert attempt(serving, tmp_path / "f8")


# ---- config faults by name -------------------------------------------------------------------
@pytest.mark.parametrize("depth", [100_000, 3000, 900])
@pytest.mark.parametrize("kind", ["lora", "ia3", "bottleneck"])
def test_a_deeply_nested_config_is_an_adapter_error(seeds, serving, tmp_path, kind, depth):
    shutil.copytree(seeds[kind], tmp_path / "deep")
    file = tmp_path / "deep" / CONFIG_FILE
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "extra": "__deep__"}).replace(DEEP, deep(depth, "[")))
    for type_name in (None, kind):
        with pytest.raises(AdapterError, match=rf"{file} is nested too deep"):
            serving[0].load(tmp_path / "deep", name="deep", type=type_name)
    serving[1]()
    with pytest.raises(AdapterError, match="nested too deep"):
        read_json_object(file, resave="save it again")


def test_check_config_refuses_deep_structures_before_recursing():
    """An in-memory config (Backbone.create, add) is never parsed: check_config itself refuses it
    before jsonschema (and the error message's repr) recurse through it."""
    value: object = 1
    for _ in range(5000):
        value = [value]
    for config in ({"r": 4, "target_modules": value}, {"r": 4, "layers_to_transform": {"a": value}}):
        with pytest.raises(AdapterError, match="nested too deep"):
            check_config(config, SCHEMA, "memory")
    bb = ah.Backbone(tiny_llama(), max_adapters=1, max_rank=8)
    with pytest.raises(AdapterError, match="nested too deep"):
        bb.create("deep", "lora", {"r": 4, "target_modules": value})
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(AdapterError, match="nested too deep"):
        check_config({"r": 4, "target_modules": cycle}, SCHEMA, "memory")


def test_nested_non_finite_numbers_are_refused():
    with pytest.raises(AdapterError, match=r"memory: alpha_pattern\.q_proj is nan; it must be a finite number"):
        check_config({"r": 4, "alpha_pattern": {"q_proj": float("nan")}}, SCHEMA, "memory")


@pytest.mark.parametrize("kind", ["lora", "ia3", "bottleneck"])
def test_a_config_that_cannot_be_read_is_named_as_such(seeds, serving, tmp_path, kind):
    """Not "no adapter_config.json": a folder of that name, a broken link, or text that is not JSON."""
    faults = {
        "folder": (lambda f: f.mkdir(), r"cannot be read \(Is a directory\)"),
        "broken link": (lambda f: f.symlink_to(tmp_path / "nowhere.json"), r"cannot be read \(No such file"),
        "not JSON": (lambda f: f.write_text("{'r': 4"), r"is not valid JSON"),
        "not UTF-8": (lambda f: f.write_bytes(b'{"r": "\xff"}'), r"is not valid JSON"),
    }
    for fault, (make, message) in faults.items():
        directory = tmp_path / fault.replace(" ", "-")
        shutil.copytree(seeds[kind], directory)
        (directory / CONFIG_FILE).unlink()
        make(directory / CONFIG_FILE)
        for type_name in (None, kind):
            with pytest.raises(AdapterError, match=rf"{directory / CONFIG_FILE} {message}") as error:
                serving[0].load(directory, name="bad", type=type_name)
            assert f"no {CONFIG_FILE}" not in str(error.value), (fault, type_name)
    serving[1]()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_config_without_read_permission_is_named(seeds, serving, tmp_path):
    shutil.copytree(seeds["lora"], tmp_path / "locked")
    file = tmp_path / "locked" / CONFIG_FILE
    os.chmod(file, 0)
    try:
        with pytest.raises(AdapterError, match=r"cannot be read \(Permission denied\)"):
            serving[0].load(tmp_path / "locked", name="locked")
    finally:
        os.chmod(file, 0o600)


# ---- identity ----------------------------------------------------------------------------------
def flipped_weight_byte(directory: Path, file: str) -> None:
    """Changes the lowest byte of the first float of the first tensor: a tiny, finite change."""
    data = bytearray((directory / file).read_bytes())
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    first = min((v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"))
    data[8 + header_length + first] ^= 1
    (directory / file).write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["lora", "ia3", "bottleneck"])
def test_digest_names_the_content(seeds, tmp_path, kind):
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=8)
    bb.load(seeds[kind], name="one")
    bb.load(seeds[kind], name="two")
    digest = bb.info("one").digest
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert bb.info("two").digest == digest  # the same files under two names
    changed = {}
    for change in ("weight", "config"):
        directory = tmp_path / change
        shutil.copytree(seeds[kind], directory)
        if change == "weight":
            flipped_weight_byte(directory, WEIGHTS[kind])
        else:
            config = json.loads((directory / CONFIG_FILE).read_text())
            config["adapterhub_note"] = "changed"  # a key no reader uses is still part of the config
            (directory / CONFIG_FILE).write_text(json.dumps(config))
        bb.swap("two", directory)
        changed[change] = bb.info("two").digest
    assert len({digest, *changed.values()}) == 3
    bb.load(tmp_path / "weight", name="three")  # evicts "one" (least recently used) to the host cache
    assert bb.names == ["two", "three"] and bb.info("three").digest == changed["weight"]
    bb.unload("two")
    bb.load(seeds[kind], name="one")  # back from the host cache, not hashed again: the same digest
    assert bb.info("one").digest == digest


def test_digest_of_an_adapter_added_from_memory(seeds):
    bb = ah.Backbone(tiny_llama(), max_adapters=3, max_rank=8)
    bb.load(seeds["lora"], name="loaded")
    adapter = ah.plugins.registry().get("lora").read(seeds["lora"])
    bb.add("added", adapter)
    assert bb.info("added").digest == bb.info("loaded").digest
    bb.create("fresh", "lora", {"r": 4, "target_modules": ["q_proj"]})
    assert len(bb.info("fresh").digest) == 64 and bb.info("fresh").digest != bb.info("loaded").digest
