"""No file an adapter load reads may lead out of its root through a symlink: --adapter-dir for the API
(Sources.resolve), the directory itself for the CLI (Sources.resolve_cli) unless it lies under
--adapter-dir, a Hub repo's cache folder for a Hub snapshot (whose files link into blobs/), and
Backbone.load(root=...) checking the same at read time. Sources no path or repo id can be (a NUL
byte, a lone surrogate, 5,000 characters) are AdapterErrors wherever they are passed."""

from __future__ import annotations

import shutil
from pathlib import Path

import hub_cache
import pytest
from tiny_models import save_peft_adapter, tiny_llama

import adapterhub as ah
from adapterhub.errors import AdapterError
from adapterhub.hub import resolve
from adapterhub.serve.tenancy import Sources

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
REPO = "org/contained"
SECRET = "top-secret-contents"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return save_peft_adapter(
        tiny_llama, tmp_path_factory.mktemp("saved") / "lora", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"]
    )


@pytest.fixture
def tree(tmp_path, adapter):
    """tmp/adapters (the --adapter-dir) holding a copy of the adapter as "good", and tmp/outside
    holding a secret file and a second copy of the weights (loadable, but outside the root)."""
    adapters, outside = tmp_path / "adapters", tmp_path / "outside"
    shutil.copytree(adapter, adapters / "good")
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    shutil.copy(adapter / WEIGHTS, outside / WEIGHTS)
    shutil.copy(adapter / CONFIG, outside / CONFIG)
    return adapters, outside


def linked_out(adapters: Path, name: str, file: str, target: Path) -> Path:
    """A copy of "good" under adapters/name whose `file` is a symlink to target."""
    directory = adapters / name
    shutil.copytree(adapters / "good", directory)
    (directory / file).unlink(missing_ok=True)
    (directory / file).symlink_to(target)
    return directory


@pytest.mark.parametrize("file", [WEIGHTS, CONFIG, "README.md"])
def test_api_refuses_a_file_linked_out_of_adapter_dir(tree, file):
    adapters, outside = tree
    target = outside / (file if file != "README.md" else "secret.txt")
    linked_out(adapters, "evil", file, target)
    with pytest.raises(AdapterError) as error:
        Sources(adapters).resolve("evil")
    message = str(error.value)
    assert f"evil/{file} is a symlink to {target}, outside {adapters}" in message
    assert "copy the file into" in message and SECRET not in message


def test_api_refuses_a_folder_inside_whose_files_lead_out(tree):
    """evil/sub -> adapters/other stays inside the root, but other/x -> outside does not: what the
    link leads to is walked too."""
    adapters, outside = tree
    (adapters / "other").mkdir()
    (adapters / "other" / "x").symlink_to(outside / "secret.txt")
    shutil.copytree(adapters / "good", adapters / "evil")
    (adapters / "evil" / "sub").symlink_to(adapters / "other", target_is_directory=True)
    with pytest.raises(AdapterError, match=r"evil/sub/x is a symlink to .*secret\.txt, outside"):
        Sources(adapters).resolve("evil")


def test_api_accepts_links_inside_adapter_dir_and_loads_them(tree):
    adapters, _ = tree
    (adapters / "shared").mkdir()
    shutil.copy(adapters / "good" / WEIGHTS, adapters / "shared" / WEIGHTS)
    linked_out(adapters, "linked", WEIGHTS, Path("../shared") / WEIGHTS)
    source = Sources(adapters).resolve("linked")
    assert source == str((adapters / "linked").resolve())
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=8)
    bb.load(source, name="linked", root=adapters)
    assert bb.names == ["linked"]


def test_backbone_load_with_root_refuses_a_link_out_and_keeps_its_adapters(tree):
    adapters, outside = tree
    evil = linked_out(adapters, "evil", WEIGHTS, outside / WEIGHTS)
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=8)
    bb.load(adapters / "good", name="good", root=adapters)
    with pytest.raises(AdapterError, match=rf"evil/{WEIGHTS} is a symlink to .*outside"):
        bb.load(evil, name="evil", root=adapters)
    with pytest.raises(AdapterError, match=r"outside"):
        bb.load(outside, name="outside", root=adapters)  # the directory itself is outside the root
    assert bb.names == ["good"]
    bb.load(evil, name="trusted")  # root=None: a library caller's own files, wherever they lead
    assert bb.names == ["good", "trusted"]


def test_cli_directory_is_its_own_root(tree, tmp_path):
    adapters, outside = tree
    cli = tmp_path / "cli"
    shutil.copytree(adapters / "good", cli / "good")
    assert Sources().resolve_cli(str(cli / "good")) == str((cli / "good").resolve())
    linked_out(cli, "evil", WEIGHTS, outside / WEIGHTS)
    with pytest.raises(AdapterError, match=rf"evil/{WEIGHTS} is a symlink to .*, outside .*cli/evil"):
        Sources().resolve_cli(str(cli / "evil"))
    with pytest.raises(AdapterError, match="is a file"):
        Sources().resolve_cli(str(cli / "good" / CONFIG))


def test_cli_directory_under_adapter_dir_has_its_root(tree, tmp_path, monkeypatch):
    """Under --adapter-dir, a link to a sibling inside it is fine (the API's rule), and a name
    relative to --adapter-dir is found from any working directory."""
    adapters, outside = tree
    (adapters / "shared").mkdir()
    shutil.copy(adapters / "good" / WEIGHTS, adapters / "shared" / WEIGHTS)
    linked_out(adapters, "linked", WEIGHTS, adapters / "shared" / WEIGHTS)
    sources = Sources(adapters)
    real = str((adapters / "linked").resolve())
    assert sources.resolve_cli(str(adapters / "linked")) == real
    monkeypatch.chdir(tmp_path)
    assert sources.resolve_cli("linked") == real
    assert sources.root(real) == adapters.resolve()
    linked_out(adapters, "evil", WEIGHTS, outside / WEIGHTS)
    with pytest.raises(AdapterError, match=rf"symlink to .*, outside {adapters}"):
        sources.resolve_cli("evil")


def test_hub_cache_snapshot_links_into_blobs_are_accepted(tree, tmp_path, monkeypatch):
    adapters, outside = tree
    cache = tmp_path / "hf"
    commit = hub_cache.add_commit(cache, REPO, hub_cache.files_of(adapters / "good"))
    snapshot = hub_cache.repo_folder(cache, REPO) / "snapshots" / commit
    assert (snapshot / WEIGHTS).is_symlink()
    sources = Sources()
    assert sources.resolve_cli(str(snapshot)) == str(snapshot.resolve())
    assert sources.root(str(snapshot)) == hub_cache.repo_folder(cache, REPO).resolve()
    assert sources.resolve_cli(REPO) == REPO  # a repo id passes through to Backbone.load
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve(REPO, cache_dir=cache, root=adapters) == snapshot  # a repo's root is its cache folder
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=8)
    bb.load(REPO, name="hub", cache_dir=cache, root=adapters)
    bb.load(snapshot, name="snapshot", root=sources.root(str(snapshot)))
    assert bb.info("hub").digest == bb.info("snapshot").digest
    # A snapshot file that leads out of the repo's cache folder is refused like any other.
    (snapshot / "notes.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(AdapterError, match=r"notes\.txt is a symlink to .*, outside .*models--org--contained"):
        sources.resolve_cli(str(snapshot))
    with pytest.raises(AdapterError, match=r"notes\.txt is a symlink"):
        resolve(REPO, cache_dir=cache, root=adapters)


BAD_SOURCES = {
    "nul": "a\x00b",
    "long": "x" * 5000,
    "long-path": "a/" * 1000,
    "surrogate": "\ud800",
    "low-surrogate": "ok/\udfff",
    "undecodable-byte": "\udcff",
    "no-such-user": "~no-such-user-adapterhub/x",
}


@pytest.mark.parametrize("source", BAD_SOURCES.values(), ids=BAD_SOURCES.keys())
def test_bad_sources_are_adapter_errors_everywhere(tree, source):
    adapters, _ = tree
    bb = ah.Backbone(tiny_llama(), max_adapters=1, max_rank=4)
    for call in (Sources(adapters, allow_hub=True).resolve, Sources(adapters).resolve, resolve, bb.load):
        with pytest.raises(AdapterError) as error:
            call(source)
        assert len(str(error.value)) < 1000, "a message quotes a long source cut short"
    for sources in (Sources(), Sources(adapters)):
        with pytest.raises(AdapterError):
            sources.resolve_cli(source)
    assert bb.names == []


@pytest.mark.parametrize("what", ["subfolder", "revision"])
def test_bad_subfolder_or_revision_is_an_adapter_error(tree, what):
    adapters, _ = tree
    with pytest.raises(AdapterError, match=f"{what} .*NUL"):
        resolve(adapters / "good" if what == "subfolder" else REPO, **{what: "a\x00b"})
