"""Resolving an adapter source into a local directory: an existing directory as is, else a Hub repo id
through huggingface_hub's cache (snapshot_download), offline when HF_HUB_OFFLINE says so.

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import; here they are read at each call,
so a server or a test that sets them later is obeyed too. Offline means local_files_only=True, and with
it snapshot_download opens no connection at all (it reads refs/ and snapshots/ in the cache).

Containment (`contain`, and `resolve(root=...)`): a directory whose files are read on someone else's
behalf (the server's --adapter-dir) must not lead outside its root through a symlink, or the loader
reads, and an error message may echo, any file the process can open. Every entry below the directory
is resolved to its real path and refused if it lies outside the root; a Hub cache snapshot's root is
its repo's cache folder (`cache_folder`), since its files are symlinks into the repo's blobs/.
The check runs before the files are read: a symlink swapped in between (by someone who may write
inside the root) is not caught.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .errors import AdapterError


def resolve(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
) -> Path:
    """The local directory holding the adapter named by source (plus subfolder).

    source: an existing directory, used as is (revision and token unused); otherwise a Hub repo id
    ("org/name") fetched at revision (branch, tag or commit; default main) into cache_dir (default:
    HF_HUB_CACHE). Only subfolder's files are fetched when it is given. A subfolder that leaves its
    directory is refused. A source that can name neither (a NUL byte, a lone surrogate, too long) is
    an AdapterError too.
    root: None (a caller's own files), or where every file of the adapter must resolve (`contain`):
    a local directory must lie under root; a Hub repo's files, in the repo's cache folder.
    """
    repo_id = checked_source(source)
    subfolder = _relative(subfolder, "subfolder")
    local = _local(repo_id)
    if local is not None:
        directory = _inside(local, subfolder, repo_id)
        return directory if root is None else contain(directory, root, repo_id)
    checked_repo_id(repo_id)
    revision = _relative(revision, "revision")
    snapshot = _download(repo_id, revision, subfolder, token, cache_dir)
    where = f"{repo_id}@{revision or constants.DEFAULT_REVISION}"
    directory = _inside(snapshot, subfolder, where)
    return directory if root is None else contain(directory, cache_folder(snapshot) or snapshot, where)


MAX_SOURCE = 4096  # bytes: PATH_MAX on Linux; no directory or repo id is longer
MAX_ENTRIES = 10_000  # files and folders `contain` looks at below one adapter directory


def checked_source(source: str | os.PathLike, what: str = "source") -> str:
    """source as text that can name a file or a repo: an AdapterError for a NUL byte, a character the
    file system cannot encode (a lone surrogate), or more than MAX_SOURCE bytes, where the os and
    pathlib calls would raise ValueError, UnicodeEncodeError or OSError."""
    try:
        text = os.fspath(source)
    except TypeError:
        raise AdapterError(f"{what} must be a path or a string, got {type(source).__name__}") from None
    if not isinstance(text, str):
        raise AdapterError(f"{what} {shown(text)} is bytes; pass it as a string")
    if "\x00" in text:
        raise AdapterError(f"{what} {shown(text)} contains a NUL byte; pass a directory or a Hub repo id")
    try:
        size = len(os.fsencode(text))
    except UnicodeEncodeError:
        raise AdapterError(
            f"{what} {shown(text)} holds a character no file name can hold (a lone surrogate); "
            "pass a directory or a Hub repo id"
        ) from None
    if size > MAX_SOURCE:
        raise AdapterError(f"{what} {shown(text)} is {size} bytes long (at most {MAX_SOURCE}); pass a shorter path")
    return text


def checked_repo_id(source: str) -> str:
    """source, if it can be a Hugging Face repo id ('org/name'); else an AdapterError saying that it is
    neither that nor an existing directory."""
    try:
        validate_repo_id(source)
    except HFValidationError as e:
        raise AdapterError(
            f"{shown(source)} is neither an existing directory nor a valid Hugging Face repo id ('org/name'): "
            "check the path, or pass a repo id"
        ) from e
    return source


def shown(text: str | bytes, n: int = 80) -> str:
    """text's repr, cut to n characters: an error message stays readable whatever it quotes."""
    return repr(text[:n]) + (f"... ({len(text)} characters)" if len(text) > n else "")


def contain(directory: str | os.PathLike, root: str | os.PathLike, source: str | None = None) -> Path:
    """directory, once it and everything below it are known to resolve inside root.

    The directory's real path, and the real path of every file and folder below it (symlinks
    followed), must lie inside root's real path; folders that symlinks lead to (inside root) are
    walked too, so nothing a loader opens below `directory` leaves root. An AdapterError names the
    first entry that escapes, where it leads, root and the fix; one names a folder that cannot be
    listed (it could hide a link), and a tree of more than MAX_ENTRIES entries. `source`: what the
    user passed, for the messages. Checked before reading: a link swapped in afterwards is not seen.
    """
    where = shown(source if source is not None else os.fspath(directory))
    real_root = os.path.realpath(root)
    real = os.path.realpath(directory)
    if not _within(real, real_root):
        raise AdapterError(
            f"source {where}: {directory} resolves to {real}, outside {real_root}; adapters load from "
            f"directories inside {real_root}: move or copy the adapter there"
        )
    seen, pending, count = {real}, [os.fspath(directory)], 0
    while pending:
        for entry in _entries(pending.pop(), where):
            count += 1
            if count > MAX_ENTRIES:
                raise AdapterError(
                    f"source {where}: {directory} holds more than {MAX_ENTRIES} files and folders; an adapter "
                    "directory holds a few: pass the directory of one adapter"
                )
            real = os.path.realpath(entry.path)
            if not _within(real, real_root):
                raise AdapterError(
                    f"source {where}: {entry.path} is a symlink to {real}, outside {real_root}, the folder this "
                    f"adapter's files must stay in; copy the file into {directory} instead of linking it"
                )
            if real not in seen and _is_dir(entry):
                seen.add(real)
                pending.append(entry.path)
    return Path(directory)


def cache_folder(directory: str | os.PathLike) -> Path | None:
    """The huggingface_hub cache folder of the repo (<cache>/models--org--name, holding snapshots/ and
    blobs/) that `directory` is a snapshot of (or a folder of one), else None: its files are symlinks
    into that folder's blobs/."""
    real = Path(os.path.realpath(directory))
    for parent in real.parents:
        if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
            return parent.parent
    return None


def _local(source: str) -> Path | None:
    """source as an existing local directory, None when it is no file at all (a Hub repo id, then);
    an AdapterError for a file, or a path the system refuses to look at (permissions, too long)."""
    try:
        local = Path(source).expanduser()
    except RuntimeError:  # "~user/..." with no such user: not a local path
        return None
    try:
        if local.is_dir():
            return local
        exists = local.exists()
    except OSError as e:
        raise AdapterError(
            f"source {shown(source)} cannot be looked up as a local directory ({e.strerror}); "
            "check the path and its permissions"
        ) from None
    if exists:
        raise AdapterError(f"{source!r} is a file; pass the directory that holds adapter_config.json")
    return None


def _within(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _entries(folder: str, where: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        raise AdapterError(
            f"source {where}: {folder} cannot be listed ({e.strerror}), so it cannot be checked to stay inside "
            "its root; fix its permissions or remove it"
        ) from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:  # a symlink loop
        return False


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub saw it at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.HF_HUB_OFFLINE or (value or "").upper() in constants.ENV_VARS_TRUE_VALUES


def _download(
    repo_id: str,
    revision: str | None,
    subfolder: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
) -> Path:
    """snapshot_download, its errors turned into AdapterErrors that say what to do."""
    cache_dir = cache_dir if cache_dir is not None else os.environ.get("HF_HUB_CACHE")
    where = f"{repo_id!r} at revision {revision or constants.DEFAULT_REVISION!r}"
    is_offline = offline()
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[f"{subfolder}/*"] if subfolder else None,
                token=token,
                cache_dir=cache_dir,
                local_files_only=is_offline,
            )
        )
    except RevisionNotFoundError as e:
        raise AdapterError(f"{where}: no such revision on the Hub; pass an existing branch, tag or commit") from e
    except RepositoryNotFoundError as e:
        raise AdapterError(
            f"{where}: repo not found on the Hub, or private/gated; check the name, or pass token= "
            "(or log in with `hf auth login`)"
        ) from e
    except LocalEntryNotFoundError as e:
        cache = cache_dir or constants.HF_HUB_CACHE
        if is_offline:
            raise AdapterError(
                f"{where} is not (completely) in the Hugging Face cache {cache} and offline mode (HF_HUB_OFFLINE=1) "
                "forbids downloading it: set HF_HUB_OFFLINE=0 to download it, or pass the path of a local adapter "
                "directory"
            ) from e
        raise AdapterError(
            f"{where} could not be fetched from the Hub and is not in the cache {cache} ({e}); check the network, "
            "or pass the path of a local adapter directory"
        ) from e


def _relative(path: str | None, what: str) -> str | None:
    """path as a relative POSIX path that stays below its directory; None, "" and "." mean none."""
    if not path:
        return None
    checked_source(path, what)
    posix = path.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith(("/", "~")) or ".." in parts or (parts and ":" in parts[0]):
        raise AdapterError(
            f"{what} {path!r} escapes its directory (absolute, '~' or '..'); pass a path inside the adapter's "
            "repo or directory, e.g. 'my-adapter'"
        )
    return "/".join(parts) or None


def _inside(root: Path, subfolder: str | None, source: str) -> Path:
    """root/subfolder, refused if a symlink takes it outside root or it is not a directory."""
    if subfolder is None:
        return root
    directory = root / subfolder
    real_root, real = os.path.realpath(root), os.path.realpath(directory)
    if not _within(real, real_root):
        raise AdapterError(
            f"subfolder {subfolder!r} of {source} leads to {real}, outside {real_root} (a symlink out); "
            "pass that directory itself as the source if you trust it"
        )
    if not _is_directory(directory):
        raise AdapterError(f"subfolder {subfolder!r} not found in {source} ({root}); check its name")
    return directory


def _is_directory(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # too long, or a folder on the way that may not be searched
        return False
