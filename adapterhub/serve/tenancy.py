"""Who may use what: API keys mapped to the adapters they may name, and where adapters may come from.

An `--api-key` file (JSON or TOML) maps each key to a list of model names (adapters, or the base
model's name) or to "*", which also allows loading and deleting adapters:

    [keys]
    "sk-tenant-a" = ["support", "legal"]
    "sk-admin" = "*"

`--api-key` given a string that is not a file is one key allowed everything. Without `--api-key`
the server is open (bind it to 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from .errors import Denied

ALL = "*"


@dataclass(frozen=True)
class Keys:
    allowed: dict[str, frozenset[str] | str]  # key -> model names, or ALL

    @classmethod
    def from_option(cls, value: str) -> Keys:
        path = Path(value)
        if not path.is_file():
            return cls({value: ALL})
        text = path.read_text()
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {error}") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, dict) or not keys:
            raise ValueError(f'{path}: expected a "keys" table mapping each API key to a list of model names or "*"')
        allowed = {}
        for key, names in keys.items():
            if names == ALL:
                allowed[key] = ALL
            elif isinstance(names, list) and all(isinstance(n, str) for n in names):
                allowed[key] = frozenset(names)
            else:
                raise ValueError(f'{path}: key {key[:6]}...: expected a list of model names or "*", got {names!r}')
        return cls(allowed)

    def names_for(self, authorization: str | None) -> frozenset[str] | str:
        """The model names (or ALL) a bearer key may use; Denied(401) for a missing or unknown key."""
        key = (authorization or "").removeprefix("Bearer ").strip()
        if key not in self.allowed:
            raise Denied(401, "missing or unknown API key: send 'Authorization: Bearer <key>'")
        return self.allowed[key]

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


@dataclass(frozen=True)
class Sources:
    """Where POST /v1/adapters may load from: directories under `adapter_dir`, Hub ids if `allow_hub`."""

    adapter_dir: Path | None = None
    allow_hub: bool = False

    def resolve(self, source: str) -> str:
        if self.adapter_dir is not None:
            root = self.adapter_dir.resolve()
            path = (root / source).resolve()
            if path.is_dir():
                if path != root and root in path.parents:
                    return str(path)
                raise AdapterError(
                    f"source {source!r} is outside --adapter-dir {root}; adapters load from directories under it"
                )
        if os.path.isabs(source) or source.startswith(".") or Path(source).exists():
            raise AdapterError(
                f"source {source!r}: local adapters load from directories under --adapter-dir "
                f"({self.adapter_dir or 'not set'}), named relative to it"
            )
        if not self.allow_hub:
            raise AdapterError(
                f"source {source!r} is not a directory under --adapter-dir "
                f"({self.adapter_dir or 'not set'}), and Hub repo ids need --allow-hub"
            )
        return source
