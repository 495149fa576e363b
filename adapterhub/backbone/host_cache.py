"""Recently evicted adapters kept in host memory, bounded in bytes, so that loading one
again costs a copy into a slot instead of reading and checking its files again."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from ..errors import AdapterError
from ..formats import Adapter


def source_key(directory: str | os.PathLike) -> tuple:
    """What identifies an adapter's files: their real path and each file's size and mtime, so that
    files rewritten in place (a retrained adapter, a new Hub commit's snapshot) are not served stale."""
    root = Path(directory).resolve()
    try:
        stats = {p.name: p.stat() for p in root.iterdir() if p.is_file()}
    except OSError as e:
        raise AdapterError(f"{root} cannot be read ({e.strerror}); check its permissions") from None
    return (str(root),) + tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats.items()))


class HostCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Adapter, int, str]] = OrderedDict()  # (adapter, bytes, digest)
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: Hashable, adapter: Adapter, digest: str = "") -> None:
        """Keeps `adapter` (with its digest as loaded, if known) under `key`, dropping the least recently
        put ones beyond max_bytes."""
        size = adapter.nbytes()
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (adapter, size, digest)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped, _) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def take(self, key: Hashable) -> Adapter | None:
        """The cached adapter for `key`, removed from the cache (it is about to live in a slot)."""
        entry = self.pop(key)
        return None if entry is None else entry[0]

    def pop(self, key: Hashable) -> tuple[Adapter, str] | None:
        """(adapter, digest) cached for `key`, removed from the cache; digest "" if it was put without."""
        with self._lock:
            if key not in self._entries:
                return None
            adapter, size, digest = self._entries.pop(key)
            self._bytes -= size
            return adapter, digest

    def __len__(self) -> int:
        return len(self._entries)
