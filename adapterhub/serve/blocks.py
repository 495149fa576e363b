"""Which KV blocks are in use, by how many sequences, and which hold a known prefix (the prefix cache).

The KV cache is a pool of fixed-size blocks (`paged.KVPool`); a sequence holds a list of them (its
block table). A block is referenced by every sequence that reads it: sequences with the same
prefix, and the choices of one request (n > 1), share its full blocks.

A full block is published under a key that chains the adapter version the tokens ran under (the
content digest of the weights in the slot: the same for the same files under any name, new for any
other weights; "" for the base model) with every token of the sequence up to the block's end:

    key_0 = H(H(adapter), tokens[0:16]);   key_i = H(key_{i-1}, tokens[16 i : 16 (i + 1)])

(prompt tuning's virtual tokens are negative placeholders there; the adapter version says which
embeddings they stand for). So a block is only ever reused by a request of the same adapter version
with the same tokens before it: a replaced adapter (same public name, new weights, new resident name)
can never read the old version's K/V. Published blocks that no sequence holds stay cached, least
recently used first out, until a sequence needs a block and no free one is left.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque


def block_keys(adapter: str, tokens: list[int], block_size: int, parent: bytes | None = None) -> list[bytes]:
    """The prefix keys of the full blocks of `tokens` (continuing the chain after `parent`)."""
    keys, key = [], parent if parent is not None else hashlib.blake2b(adapter.encode(), digest_size=16).digest()
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(key, digest_size=16)
        h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens[start : start + block_size]))
        key = h.digest()
        keys.append(key)
    return keys


class Blocks:
    """Reference counts of `count` blocks, and the prefix cache over them (LRU of unreferenced ones)."""

    def __init__(self, count: int):
        self.count = count
        self.refs = [0] * count
        self._free: deque[int] = deque(range(count))  # never published, or their key was dropped
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # published, unreferenced: oldest first
        self.hits = self.lookups = self.evictions = 0

    def available(self) -> int:
        """Blocks a sequence may take now (free ones, then cached ones nobody holds)."""
        return len(self._free) + len(self._idle)

    def used(self) -> int:
        return self.count - self.available()

    def cached(self) -> int:
        return len(self._key_of)

    def take(self) -> int | None:
        """A block for one sequence (reference 1), or None when every block is held."""
        if self._free:
            block = self._free.popleft()
        elif self._idle:
            block, _ = self._idle.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            self.evictions += 1
        else:
            return None
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more sequence holds `block` (a fork of a request's choices)."""
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._key_of:
                self._idle[block] = None
            else:
                self._free.append(block)

    def lookup(self, key: bytes) -> int | None:
        """The cached block holding the prefix `key`, now held once more; None on a miss."""
        self.lookups += 1
        block = self._block_of.get(key)
        if block is None:
            return None
        self.hits += 1
        if self.refs[block] == 0:
            del self._idle[block]
        self.refs[block] += 1
        return block

    def publish(self, block: int, key: bytes) -> None:
        """Records that the held `block` holds the prefix `key` (kept if another block has it already)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def clear_cache(self) -> None:
        """Forgets every published prefix (blocks in use stay in use)."""
        for block in list(self._idle):
            self._free.append(block)
        self._idle.clear()
        self._key_of.clear()
        self._block_of.clear()
