"""Recently evicted adapters kept in host memory, bounded in bytes, so that loading one
again costs a copy into a slot instead of reading and checking its files again."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from ..formats import Adapter


def source_key(directory: str | os.PathLike) -> tuple:
    """What identifies an adapter's files: their real path and each file's size and mtime, so that
    files rewritten in place (a retrained adapter, a new Hub commit's snapshot) are not served stale."""
    root = Path(directory).resolve()
    stats = {p.name: p.stat() for p in root.iterdir() if p.is_file()}
    return (str(root),) + tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats.items()))


class HostCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Adapter, int]] = OrderedDict()  # (adapter, bytes), LRU first
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: Hashable, adapter: Adapter) -> None:
        size = adapter.nbytes()
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (adapter, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def take(self, key: Hashable) -> Adapter | None:
        """The cached adapter for `key`, removed from the cache (it is about to live in a slot)."""
        with self._lock:
            adapter, size = self._entries.pop(key, (None, 0))
            self._bytes -= size
            return adapter

    def __len__(self) -> int:
        return len(self._entries)
