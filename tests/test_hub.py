"""Resolving sources: local directories, and repo ids through a real huggingface_hub cache on disk
(tests/hub_cache.py), offline, by branch, tag, commit and subfolder, with no network attempt at all.

Network attempts are seen by a Python audit hook on socket.getaddrinfo/socket.connect (no mock of
huggingface_hub): while a test holds the `network` fixture, each attempt is recorded and refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import hub_cache
import pytest
from huggingface_hub import constants, scan_cache_dir
from test_formats_peft_lora import assert_same_adapter, make_peft

from adapterhub.errors import AdapterError
from adapterhub.formats import read_peft_lora
from adapterhub.hub import resolve

REPO = "org/adapter"
_GUARDS: list[list] = []  # the attempt lists of the tests now guarding the network


def _audit(event: str, args: tuple) -> None:
    if _GUARDS and event in ("socket.getaddrinfo", "socket.connect"):
        _GUARDS[-1].append((event, args))
        raise ConnectionRefusedError(f"tests/test_hub.py: no network in tests ({event} {args[:2]})")


@pytest.fixture(scope="session")
def _audit_hook():
    sys.addaudithook(_audit)  # process-wide and permanent, hence inert unless a test holds `network`


@pytest.fixture
def network(_audit_hook):
    """The network attempts made during the test (each one refused)."""
    attempts: list = []
    _GUARDS.append(attempts)
    yield attempts
    _GUARDS.remove(attempts)


@pytest.fixture
def offline(monkeypatch, network):
    """HF_HUB_OFFLINE=1, set after huggingface_hub was imported (so only adapterhub.hub can honour it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield network
    assert network == [], "offline mode must not touch the network"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three saved peft adapters: name -> directory."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "main": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "extra": dict(r=2, lora_alpha=4, target_modules=["o_proj"], use_dora=True),
        "tagged": dict(r=3, lora_alpha=3, target_modules=["down_proj"]),
    }
    for name, kwargs in specs.items():
        make_peft("llama", **kwargs).save_pretrained(root / name)
    return {name: root / name for name in specs}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, adapters):
    """A cache holding REPO: main = adapter "main" at the root + adapter "extra" in subfolder "extra";
    tag v2 = adapter "tagged". Returns (cache dir, {ref: commit})."""
    directory = tmp_path_factory.mktemp("hf_cache")
    first = hub_cache.add_commit(
        directory, REPO, {**hub_cache.files_of(adapters["main"]), **hub_cache.files_of(adapters["extra"], "extra")}
    )
    second = hub_cache.add_commit(directory, REPO, hub_cache.files_of(adapters["tagged"]), refs=("v2",))
    return directory, {"main": first, "v2": second}


def snapshot(cache_dir: Path, commit: str) -> Path:
    return hub_cache.repo_folder(cache_dir, REPO) / "snapshots" / commit


def test_cache_is_what_huggingface_hub_reads(cache):
    cache_dir, commits = cache
    info = scan_cache_dir(cache_dir)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == REPO
    assert {ref: rev.commit_hash for ref, rev in repo.refs.items()} == commits
    files = {
        f.file_path.relative_to(snapshot(cache_dir, commits["main"])).as_posix()
        for rev in repo.revisions
        if rev.commit_hash == commits["main"]
        for f in rev.files
    }
    assert files >= {"adapter_config.json", "adapter_model.safetensors", "extra/adapter_model.safetensors"}


def test_repo_id_offline(cache, adapters, offline):
    cache_dir, commits = cache
    path = resolve(REPO, cache_dir=cache_dir)
    assert path == snapshot(cache_dir, commits["main"])
    assert (path / "adapter_model.safetensors").is_symlink()
    assert_same_adapter(read_peft_lora(path), read_peft_lora(adapters["main"]))


@pytest.mark.parametrize("revision", ["v2", "commit"])
def test_revision_offline(cache, adapters, offline, revision):
    cache_dir, commits = cache
    path = resolve(REPO, revision=commits["v2"] if revision == "commit" else revision, cache_dir=cache_dir)
    assert path == snapshot(cache_dir, commits["v2"])
    assert_same_adapter(read_peft_lora(path), read_peft_lora(adapters["tagged"]))


def test_subfolder_offline(cache, adapters, offline):
    cache_dir, commits = cache
    path = resolve(REPO, subfolder="extra", cache_dir=cache_dir)
    assert path == snapshot(cache_dir, commits["main"]) / "extra"
    assert_same_adapter(read_peft_lora(path), read_peft_lora(adapters["extra"]))


def test_cache_dir_from_hf_hub_cache_env(cache, offline, monkeypatch):
    cache_dir, commits = cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    assert resolve(REPO, revision="v2") == snapshot(cache_dir, commits["v2"])


@pytest.mark.skipif(constants.HF_HUB_OFFLINE, reason="huggingface_hub was imported offline: it never tries")
def test_network_guard_sees_an_online_lookup(cache, network, monkeypatch):
    """Control for the offline tests: without HF_HUB_OFFLINE, huggingface_hub asks the Hub first
    (the guard records and refuses it) and then falls back to the cache."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    cache_dir, commits = cache
    assert resolve(REPO, cache_dir=cache_dir) == snapshot(cache_dir, commits["main"])
    assert network, "an online resolve must have tried the network"


def test_offline_from_process_start_with_unroutable_endpoint(cache, adapters, tmp_path):
    """The usual setup: env set before Python starts; the endpoint could not be reached anyway."""
    cache_dir, commits = cache
    script = textwrap.dedent(f"""
        import json, sys
        attempts = []
        def audit(event, args):
            if event in ("socket.getaddrinfo", "socket.connect"):
                attempts.append(event)
                raise ConnectionRefusedError(event)
        sys.addaudithook(audit)
        from adapterhub.hub import resolve
        print(json.dumps([str(resolve({REPO!r}, subfolder="extra")), attempts]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    path, attempts = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(path) == snapshot(cache_dir, commits["main"]) / "extra"
    assert attempts == []


def test_local_directory_as_is(adapters, network):
    root = adapters["main"].parent
    assert resolve(adapters["main"]) == adapters["main"]
    assert resolve(str(root), subfolder="extra") == root / "extra"
    assert resolve(root, subfolder="extra/") == root / "extra"
    assert resolve(root, subfolder="") == resolve(root, subfolder=".") == root
    assert network == []


# --- refused sources ---------------------------------------------------------------------------------


def test_not_cached_while_offline(cache, offline):
    with pytest.raises(AdapterError, match=r"'org/missing'.*HF_HUB_OFFLINE=0.*local adapter directory"):
        resolve("org/missing", cache_dir=cache[0])


def test_unknown_revision_while_offline(cache, offline):
    with pytest.raises(AdapterError, match=r"revision 'v9'.*HF_HUB_OFFLINE=0"):
        resolve(REPO, revision="v9", cache_dir=cache[0])


def test_missing_subfolder(cache, offline):
    with pytest.raises(AdapterError, match=r"subfolder 'nope' not found in org/adapter@main"):
        resolve(REPO, subfolder="nope", cache_dir=cache[0])


@pytest.mark.parametrize("subfolder", ["../main", "/etc", "extra/../../main", "~", "..", "C:/x", "a\\..\\.."])
@pytest.mark.parametrize("source", ["directory", "repo"])
def test_subfolder_that_escapes(cache, adapters, offline, source, subfolder):
    where = adapters["extra"].parent if source == "directory" else REPO
    with pytest.raises(AdapterError, match=re.escape(f"subfolder {subfolder!r} escapes")):
        resolve(where, subfolder=subfolder, cache_dir=cache[0])


def test_subfolder_symlink_out(tmp_path, adapters):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "link").symlink_to(adapters["main"], target_is_directory=True)
    with pytest.raises(AdapterError, match=r"subfolder 'link' of .* leads to .*main, outside .*repo"):
        resolve(tmp_path / "repo", subfolder="link")


def test_revision_that_escapes(cache, offline):
    with pytest.raises(AdapterError, match=r"revision '../../x' escapes"):
        resolve(REPO, revision="../../x", cache_dir=cache[0])


@pytest.mark.parametrize("source", ["not a repo!!", "./no/such/dir", "org/name/extra"])
def test_neither_directory_nor_repo_id(source, network):
    with pytest.raises(AdapterError, match=rf"{source!r} is neither an existing directory nor a valid"):
        resolve(source)
    assert network == []


def test_file_instead_of_directory(adapters):
    with pytest.raises(AdapterError, match=r"adapter_config\.json.* is a file; pass the directory"):
        resolve(adapters["main"] / "adapter_config.json")
