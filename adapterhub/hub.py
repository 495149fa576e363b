"""Resolving an adapter source into a local directory: an existing directory as is, else a Hub repo id
through huggingface_hub's cache (snapshot_download), offline when HF_HUB_OFFLINE says so.

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import; here they are read at each call,
so a server or a test that sets them later is obeyed too. Offline means local_files_only=True, and with
it snapshot_download opens no connection at all (it reads refs/ and snapshots/ in the cache).
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
) -> Path:
    """The local directory holding the adapter named by source (plus subfolder).

    source: an existing directory, used as is (revision and token unused); otherwise a Hub repo id
    ("org/name") fetched at revision (branch, tag or commit; default main) into cache_dir (default:
    HF_HUB_CACHE). Only subfolder's files are fetched when it is given. A subfolder that leaves its
    directory is refused.
    """
    subfolder = _relative(subfolder, "subfolder")
    local = Path(source).expanduser()
    if local.is_dir():
        return _inside(local, subfolder, str(source))
    repo_id = os.fspath(source)
    if local.exists():
        raise AdapterError(f"{repo_id!r} is a file; pass the directory that holds adapter_config.json")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise AdapterError(
            f"{repo_id!r} is neither an existing directory nor a valid Hugging Face repo id ('org/name'): "
            "check the path, or pass a repo id"
        ) from e
    revision = _relative(revision, "revision")
    snapshot = _download(repo_id, revision, subfolder, token, cache_dir)
    return _inside(snapshot, subfolder, f"{repo_id}@{revision or constants.DEFAULT_REVISION}")


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
    real_root, real = root.resolve(), directory.resolve()
    if real != real_root and real_root not in real.parents:
        raise AdapterError(
            f"subfolder {subfolder!r} of {source} leads to {real}, outside {real_root} (a symlink out); "
            "pass that directory itself as the source if you trust it"
        )
    if not directory.is_dir():
        raise AdapterError(f"subfolder {subfolder!r} not found in {source} ({root}); check its name")
    return directory
