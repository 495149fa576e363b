"""Writes a real huggingface_hub cache on disk, the layout snapshot_download leaves behind, so that
tests resolve repo ids offline through huggingface_hub itself, with no mocks.

    <cache>/models--<org>--<name>/
        blobs/<etag>                  file contents; etag = sha256 for LFS files, git blob sha1 for others
        snapshots/<commit>/<path>     relative symlink -> ../../blobs/<etag> (deeper for subfolders)
        refs/<branch or tag>          the commit hash, no newline
        trees/<commit>.json           the tree listing snapshot_download caches (format_version 1)
    <cache>/.locks/models--<org>--<name>/<etag>.lock

(huggingface_hub: file_download._hf_hub_download_to_cache_dir, _create_symlink,
_cache_commit_hash_for_specific_revision; _tree_cache.write_tree_cache.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin")  # tracked by git-lfs in the default .gitattributes
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def repo_folder(cache_dir: str | os.PathLike, repo_id: str) -> Path:
    """<cache>/models--org--name, as huggingface_hub.file_download.repo_folder_name."""
    return Path(cache_dir) / "--".join(["models", *repo_id.split("/")])


def files_of(directory: str | os.PathLike, under: str = "") -> dict[str, bytes]:
    """The files below directory as {repo path: contents}, put under the repo folder `under`."""
    root = Path(directory)
    return {
        "/".join(filter(None, [under, p.relative_to(root).as_posix()])): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def add_commit(
    cache_dir: str | os.PathLike, repo_id: str, files: Mapping[str, bytes], refs: tuple[str, ...] = ("main",)
) -> str:
    """Cache one commit of repo_id holding files (plus .gitattributes); refs point at it. Returns its hash."""
    storage = repo_folder(cache_dir, repo_id)
    files = {".gitattributes": GITATTRIBUTES, **files}
    entries = {path: _entry(path, data) for path, data in sorted(files.items())}
    commit = hashlib.sha1(json.dumps([repo_id, entries], sort_keys=True).encode()).hexdigest()

    for path, data in files.items():
        etag = entries[path].get("lfs_sha256", entries[path]["blob_id"])
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / path
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        lock = Path(cache_dir) / ".locks" / storage.name / f"{etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    tree = storage / "trees" / f"{commit}.json"
    tree.parent.mkdir(parents=True, exist_ok=True)
    tree.write_text(json.dumps({"format_version": 1, "files": entries}, indent=1))
    return commit


def _entry(path: str, data: bytes) -> dict:
    """The tree-listing entry of a file: size and git blob id; for LFS files the blob is the LFS pointer."""
    if not path.endswith(LFS_SUFFIXES):
        return {"size": len(data), "blob_id": _git_blob_id(data)}
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    return {"size": len(data), "blob_id": _git_blob_id(pointer), "lfs_sha256": sha256, "lfs_size": len(data)}


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
