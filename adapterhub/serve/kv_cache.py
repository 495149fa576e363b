"""The server's KV cache: a pool of blocks (paged.KVPool), who holds which (blocks.Blocks), and each
row's block table, with the prefix cache on top.

A row's `KVState` is its tokens (prompt, then what it generated), how many of them have K/V in the
pool (`computed`) and the blocks that hold them. Rows grow one block at a time, share full blocks
with rows of the same prefix and adapter version, and give their blocks back when they finish or
are preempted (their K/V is recomputed from their tokens when they run again).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import Blocks, block_keys
from .paged import Chunk, KVPool, Step

BLOCK_SIZE = 16  # tokens per block: the prefix cache's granularity


@dataclass
class KVState:
    """One row's tokens and where their K/V lives."""

    adapter: str  # the prefix-cache key of the weights it runs under ("" = the base model)
    tokens: list[int]
    computed: int = 0  # tokens[:computed] have K/V in `blocks`
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # prefix keys of its published blocks (blocks[:len(keys)])
    looked_up: bool = False  # its prefix was looked up since it last held no block
    counted: bool = False  # its first lookup was counted in KVCache.reused_tokens
    shares: bool = True  # may take cached prefix blocks (False: every token's logits are needed, prompt logprobs)

    def remaining(self) -> int:
        return len(self.tokens) - self.computed


def default_budget(model: nn.Module, max_tokens: int) -> int:
    """Bytes for the KV cache when none are given: room for `max_tokens` tokens, at most a quarter of
    the memory free on the model's device."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min((max_tokens + BLOCK_SIZE) * KVPool.bytes_per_token(model), free // 4)  # + the trash block


class KVCache:
    def __init__(self, model: nn.Module, budget_bytes: int, *, prefix_cache: bool = True):
        blocks = budget_bytes // (KVPool.bytes_per_token(model) * BLOCK_SIZE) - 1  # and the pool's trash block
        if blocks < 1:
            raise ValueError(
                f"a KV cache of {budget_bytes} bytes holds fewer than 2 blocks of {BLOCK_SIZE} tokens "
                f"({KVPool.bytes_per_token(model)} bytes per token; one takes padding); raise --kv-cache-bytes"
            )
        self.pool = KVPool(model, blocks, BLOCK_SIZE)
        self.blocks = Blocks(blocks)
        self.prefix_cache = prefix_cache
        self.reused_tokens = 0  # tokens whose K/V came from the prefix cache at each row's first lookup
        self.device = next(model.parameters()).device

    @property
    def tokens(self) -> int:
        """Tokens the whole cache holds."""
        return self.blocks.count * BLOCK_SIZE

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // BLOCK_SIZE)

    def reuse_prefix(self, row: KVState) -> int:
        """Takes the cached blocks of the row's longest known prefix (leaving at least its last token
        to compute, whose logits it needs), once per row that holds no block; returns the tokens reused."""
        if not self.prefix_cache or not row.shares or row.blocks or row.looked_up:
            return 0
        row.looked_up = True
        for key in block_keys(row.adapter, row.tokens[: len(row.tokens) - 1], BLOCK_SIZE):
            block = self.blocks.lookup(key)
            if block is None:
                break
            row.blocks.append(block)
            row.keys.append(key)
        row.computed = len(row.blocks) * BLOCK_SIZE
        if not row.counted:  # later lookups (after a preemption) re-read the row's own blocks
            self.reused_tokens += row.computed
            row.counted = True
        return row.computed

    def room(self, row: KVState) -> int:
        """Tokens the row can add with the blocks it holds and those available."""
        return (len(row.blocks) + self.blocks.available()) * BLOCK_SIZE - row.computed

    def grow(self, row: KVState, count: int) -> bool:
        """Gives the row blocks for `count` more tokens; False (and nothing taken) if too few are left."""
        missing = self.blocks_for(row.computed + count) - len(row.blocks)
        if missing > self.blocks.available():
            return False
        row.blocks.extend(self.blocks.take() for _ in range(missing))
        return True

    def publish(self, row: KVState) -> None:
        """Publishes the row's blocks that became full of computed tokens (prefix cache)."""
        full = row.computed // BLOCK_SIZE
        if not self.prefix_cache or full <= len(row.keys):
            return
        start = len(row.keys) * BLOCK_SIZE
        keys = block_keys(
            row.adapter, row.tokens[start : full * BLOCK_SIZE], BLOCK_SIZE, row.keys[-1] if row.keys else None
        )
        for block, key in zip(row.blocks[len(row.keys) :], keys):
            self.blocks.publish(block, key)
        row.keys.extend(keys)

    def free(self, row: KVState) -> None:
        """Gives back the row's blocks, last first (so the prefix cache drops a chain's tail before
        its head); its K/V must be computed again before it runs on."""
        for block in reversed(row.blocks):
            self.blocks.release(block)
        row.blocks, row.keys, row.computed, row.looked_up = [], [], 0, False

    def owns_a_block(self, row: KVState) -> bool:
        """Whether freeing the row would free a block (one that no other row holds)."""
        return any(self.blocks.refs[block] == 1 for block in row.blocks)

    def fork(self, row: KVState) -> KVState:
        """A copy of the row sharing its full blocks (its partial last block copied), or with nothing
        cached when no block is left for that copy."""
        copy = KVState(row.adapter, list(row.tokens))
        full = row.computed // BLOCK_SIZE
        partial = row.computed % BLOCK_SIZE and self.blocks.available() > 0
        if full == len(row.blocks) or partial:
            for block in row.blocks[:full]:
                self.blocks.share(block)
            copy.blocks, copy.keys, copy.computed = row.blocks[:full], list(row.keys[:full]), row.computed
            if partial:
                block = self.blocks.take()
                self.pool.copy_block(row.blocks[full], block)
                copy.blocks = [*copy.blocks, block]
        return copy

    def step(self, rows: list[tuple[KVState, int]], pad: int = 0) -> Step:
        """The attention indices of a step running `count` new tokens of each row (and `pad` padding tokens)."""
        return Step(self.pool, [Chunk(row.blocks, row.computed, count) for row, count in rows], self.device, pad)
