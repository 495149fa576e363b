"""Who may use what: API keys mapped to the adapters they may name, and where adapters may come from.

An `--api-key` file (JSON or TOML) maps each key to a list of model names (adapters, or the base
model's name) or to "*", which also allows loading and deleting adapters:

    [keys]
    "sk-tenant-a" = ["support", "legal"]
    "sk-admin" = "*"

`--api-key` given a string that is not a file (and does not look like a path: no path separator,
not ending in .json or .toml) is one key allowed everything. Without `--api-key` the server is open
(bind it to 127.0.0.1). Keys are compared in constant time, against every configured key.

Sources: the API loads only directories under --adapter-dir (and Hub repo ids with --allow-hub); the
CLI's --adapter loads any directory. Either way no file of the adapter may lead out of its root (the
--adapter-dir, or the CLI's directory itself) through a symlink (`contain`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..backbone import cache_folder, checked_repo_id, checked_source, contain, shown
from ..errors import AdapterError
from .errors import Denied

ALL = "*"
KEY_FILE_SUFFIXES = (".json", ".toml")


@dataclass(frozen=True)
class Keys:
    """API keys and what each may use (see the module docstring). A key that is empty, blank or has
    spaces at its ends is a ValueError: no Authorization header could send it, and an empty one
    would read as "no key". Lookups never index by the secret: each is compared with every key."""

    allowed: dict[str, frozenset[str] | str]  # key -> model names, or ALL
    _digests: tuple[tuple[bytes, frozenset[str] | str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in self.allowed:
            _check_key(key)
        digests = tuple((_digest(key), names) for key, names in self.allowed.items())
        object.__setattr__(self, "_digests", digests)

    @classmethod
    def from_option(cls, value: str) -> Keys:
        """The keys `--api-key value` configures: a keys file (JSON or TOML), else the value as one admin
        key. ValueError (naming the file or saying what is wrong) for an empty key, a value that looks
        like a file path (a path separator, or .json/.toml at the end) but names no file, a file that
        cannot be read or parsed, or a keys table that is not key -> list of names or "*"."""
        if "\x00" in value:
            raise ValueError("the value contains a NUL byte; pass a key or the path of a keys file")
        if not value.strip():
            raise ValueError(
                "the key is empty: requests without an Authorization header would be admin; "
                "pass a key or the path of a keys file"
            )
        path = _expanded(value)
        if _is_file(path):
            return cls(_parse(path, _read(path)))
        if _looks_like_path(value):
            what = "not a file" if _exists(str(path)) else "no such file"
            raise ValueError(
                f"{value}: {what}; pass an existing keys file (JSON or TOML), or a key that has no path "
                f"separator and does not end in {' or '.join(KEY_FILE_SUFFIXES)}"
            )
        return cls({value: ALL})

    def names_for(self, authorization: str | None) -> frozenset[str] | str:
        """The model names (or ALL) a bearer key may use; Denied(401) for a missing or unknown key.

        The scheme "Bearer" in any case; the key is compared with every configured key in constant
        time (their sha256s, with hmac.compare_digest), so a response's timing tells nothing of it."""
        key = _bearer(authorization)
        found: frozenset[str] | str | None = None
        if key is not None:
            wanted = _digest(key)
            for digest, names in self._digests:
                if hmac.compare_digest(wanted, digest):
                    found = names
        if found is None:
            raise Denied(401, "missing or unknown API key: send 'Authorization: Bearer <key>'")
        return found

    def check(self, authorization: str | None, model: str | None = None) -> None:
        """Raises Denied(401) without a known bearer key, Denied(403) when the key may not use `model`
        (None: the admin endpoints, which need "*")."""
        names = self.names_for(authorization)
        if names == ALL:
            return
        if model is None:
            raise Denied(403, 'this API key may not load or delete adapters (it needs "*" in the keys file)')
        if model not in names:
            raise Denied(403, f"this API key may not use model {model!r}")

    def visible(self, authorization: str | None, names: list[str]) -> list[str]:
        """The `names` the key may use (Denied(401) for an unknown key)."""
        allowed = self.names_for(authorization)
        return names if allowed == ALL else [n for n in names if n in allowed]


def _bearer(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (scheme in any case), else None."""
    parts = (authorization or "").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


def _digest(key: str) -> bytes:
    """A fixed-length stand-in for a key, so that comparing two takes the same time whatever their
    lengths; surrogatepass: any str (a JSON key may hold a lone surrogate) maps to distinct bytes."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key.strip():
        raise ValueError(
            f"API key {key!r} is empty: requests without an Authorization header would match it; remove it"
        )
    if key != key.strip():
        raise ValueError(
            f"API key {key[:6]!r}... has spaces at its start or end, which no Authorization header can "
            "send; remove them"
        )


def _looks_like_path(value: str) -> bool:
    separators = {os.sep, os.altsep or os.sep, "/"}
    return value.lower().endswith(KEY_FILE_SUFFIXES) or any(s in value for s in separators)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror}); check its permissions") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}); save it as UTF-8") from None


def _parse(path: Path, text: str) -> dict[str, frozenset[str] | str]:
    """The keys table of a keys file's text: key -> frozenset of model names, or ALL."""
    toml = path.suffix.lower() == ".toml"
    try:
        data = tomllib.loads(text) if toml else json.loads(text)
    except (ValueError, RecursionError) as error:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid {'TOML' if toml else 'JSON'}: {error}") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, dict) or not keys:
        raise ValueError(f'{path}: expected a "keys" table mapping each API key to a list of model names or "*"')
    allowed: dict[str, frozenset[str] | str] = {}
    for key, names in keys.items():
        try:
            _check_key(key)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if names == ALL:
            allowed[key] = ALL
        elif isinstance(names, list) and all(isinstance(n, str) for n in names):
            allowed[key] = frozenset(names)
        else:
            raise ValueError(f'{path}: key {key[:6]}...: expected a list of model names or "*", got {names!r}')
    return allowed


@dataclass(frozen=True)
class Sources:
    """Where adapters may load from. The API (POST /v1/adapters, `resolve`): directories under
    `adapter_dir`, Hub ids if `allow_hub`. The CLI (`adapterhub serve --adapter NAME=SOURCE`,
    `resolve_cli`): any directory, or one named relative to `adapter_dir`, or a Hub id. Every file of a
    local adapter must resolve (symlinks followed) inside its root: `adapter_dir` for the API, and for
    the CLI too when the directory lies under it; else the CLI's directory itself (a Hub cache
    snapshot: its repo's cache folder, which holds the blobs its files link to)."""

    adapter_dir: Path | None = None
    allow_hub: bool = False

    def resolve(self, source: str) -> str:
        """The real path of `source`, a directory under adapter_dir whose files all stay inside it, or
        `source` itself if it is a valid Hub repo id and allow_hub; else an AdapterError saying why."""
        text = checked_source(source)
        if self.adapter_dir is not None:
            root = _real(self.adapter_dir, "--adapter-dir")
            path = root / text
            if _is_dir(path):
                real = _real(path, text)
                if real != root and root in real.parents:
                    return str(contain(path, root, text).resolve())
                raise AdapterError(
                    f"source {shown(text)} is outside --adapter-dir {root}; adapters load from directories under it"
                )
        if os.path.isabs(text) or text.startswith(".") or _exists(text):
            raise AdapterError(
                f"source {shown(text)}: local adapters load from directories under --adapter-dir "
                f"({self.adapter_dir or 'not set'}), named relative to it"
            )
        if not self.allow_hub:
            raise AdapterError(
                f"source {shown(text)} is not a directory under --adapter-dir "
                f"({self.adapter_dir or 'not set'}), and Hub repo ids need --allow-hub"
            )
        return checked_repo_id(text)

    def resolve_cli(self, source: str) -> str:
        """`--adapter NAME=SOURCE` as Backbone.load's source: an existing directory (after `~`, relative
        to the working directory) checked against its root (`root`), as its real path; else a directory
        named relative to adapter_dir, as `resolve` does; else a Hub repo id, as is (the operator needs
        no --allow-hub). An AdapterError for a file, a symlink out of the root, or a source no path or
        id can be."""
        text = checked_source(source)
        local = _expanded(text)
        if _is_dir(local):
            return str(contain(local, self.root(str(local)), text).resolve())
        if _exists(str(local)):
            raise AdapterError(
                f"--adapter source {shown(text)} is a file; pass the directory that holds adapter_config.json"
            )
        if self.adapter_dir is not None and not os.path.isabs(text) and _is_dir(Path(self.adapter_dir) / text):
            return self.resolve(text)
        return checked_repo_id(text)

    def root_of(self, source: str) -> str:
        """Backbone.load's `root=` for a source `resolve` or `resolve_cli` returned: a local directory's
        root (`root`); a Hub repo id itself (the loader keeps a Hub repo's files inside its cache
        folder, whatever `root` names)."""
        return str(self.root(source)) if os.path.isabs(source) else source

    def root(self, directory: str) -> Path:
        """The root a local adapter directory's files must stay in: adapter_dir if it lies under it,
        else its Hub repo's cache folder if it is a snapshot, else the directory itself. For
        Backbone.load(..., root=) when the source is loaded, to check again at read time."""
        real = _real(Path(directory), directory)
        if self.adapter_dir is not None:
            adapter_dir = _real(self.adapter_dir, "--adapter-dir")
            if real == adapter_dir or adapter_dir in real.parents:
                return adapter_dir
        return cache_folder(real) or real


def _real(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except (OSError, ValueError, RuntimeError) as error:  # a symlink loop, a bad name
        raise AdapterError(f"{what}: cannot resolve {path} ({error})") from None


def _expanded(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~user" with no such user
        return Path(text)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # too long, a folder on the way that may not be searched
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _exists(text: str) -> bool:
    try:
        return os.path.lexists(text)
    except (OSError, ValueError):
        return False
