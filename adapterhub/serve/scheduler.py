"""Which tokens of which rows the next step runs (iteration-level scheduling under a token budget).

Every row past its prompt gets its next token first; prompt chunks of the other rows fill the rest
of `max_step_tokens`, oldest row first (chunked prefill: a long prompt is spread over several steps
and never stalls decoding). A row that needs a KV block when none is left takes blocks from the
youngest rows that own one (preemption: they give their blocks back and are recomputed from their
tokens later); a row never takes blocks from an older one, and rows younger than one that waits do
not run in that step. If no row can run at all (every block held by rows in the middle of their
prompts), the youngest row that owns a block gives it back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from .kv_cache import KVCache, KVState


class Row(Protocol):
    kv: KVState


Plan = list[tuple[Row, int]]  # (row, tokens it runs this step), decode rows first


def plan_step(rows: Sequence[Row], kv: KVCache, max_step_tokens: int, preempt: Callable[[Row], None]) -> Plan:
    """The next step's plan for `rows` (in admission order); `preempt(row)` frees a row's blocks."""
    freed: set[int] = set()  # rows preempted during this step: they run again from the next one
    while True:
        plan = _plan(rows, kv, max_step_tokens, preempt, freed)
        if plan:
            return plan
        # Nothing can run: the youngest row that owns a block gives it back; failing that (every held
        # block shared), the youngest holder lets go of its share.
        holders = [r for r in rows if id(r) not in freed and r.kv.blocks]
        victim = next((r for r in reversed(holders) if kv.owns_a_block(r.kv)), holders[-1] if holders else None)
        if victim is None:
            return plan  # nobody holds a block: rows wait for none (cannot happen while one fits alone)
        preempt(victim)
        freed.add(id(victim))


def _plan(rows: Sequence[Row], kv: KVCache, budget: int, preempt: Callable[[Row], None], freed: set[int]) -> Plan:
    plan: Plan = []
    waiting = set(freed)  # rows that do not run in this step
    held_back: list[int] = []  # where rows waited for blocks, or gave theirs to an older row
    for i, row in enumerate(rows):
        if row.kv.remaining() != 1 or id(row) in waiting:
            continue
        while not kv.grow(row.kv, 1):  # out of blocks: the youngest rows (not yet planned) give theirs
            younger = rows[i + 1 :]
            victim = next((r for r in reversed(younger) if id(r) not in waiting and kv.owns_a_block(r.kv)), None)
            if victim is None:  # nobody younger frees a block: this row waits (keeping shared blocks)
                if kv.owns_a_block(row.kv):
                    preempt(row)
                    freed.add(id(row))
                waiting.add(id(row))
                held_back.append(i)
                break
            preempt(victim)
            freed.add(id(victim))
            waiting.add(id(victim))
            held_back.append(rows.index(victim))
        if id(row) not in waiting:
            plan.append((row, 1))
    budget -= len(plan)
    # Rows younger than one that waited or gave its blocks to an older row must not take them now.
    for row in rows[: min(held_back, default=len(rows))]:
        if budget <= 0:
            break
        if row.kv.remaining() <= 1 or id(row) in waiting:
            continue
        kv.reuse_prefix(row.kv)  # a new or preempted row: its prefix may be cached
        count = min(row.kv.remaining(), budget, kv.room(row.kv))
        if count > 0 and kv.grow(row.kv, count):
            plan.append((row, count))
            budget -= count
    return plan
