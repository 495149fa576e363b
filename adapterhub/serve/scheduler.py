"""Which tokens of which rows the next step runs (iteration-level scheduling under a token budget).

Every row past its prompt gets its next token first; prompt chunks of the other rows fill the rest
of `max_step_tokens`, oldest row first (chunked prefill: a long prompt is spread over several steps
and never stalls decoding). A row that needs a KV block when none is left takes blocks from the
youngest rows (preemption: they give their blocks back and are recomputed from their tokens later);
a row never takes blocks from an older one. If no row can run at all (every block held by rows in
the middle of their prompts), the youngest row that holds a block of its own gives it back.
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
    preempted: set[int] = set()  # rows preempted during this step: they wait for the next one
    while True:
        plan = _plan(rows, kv, max_step_tokens, preempt, preempted)
        if plan:
            return plan
        victim = next((r for r in reversed(rows) if id(r) not in preempted and kv.owns_a_block(r.kv)), None)
        if victim is None:
            return plan  # nothing runs, nothing can be freed: rows wait for blocks (nobody holds one)
        preempt(victim)
        preempted.add(id(victim))


def _plan(rows: Sequence[Row], kv: KVCache, budget: int, preempt: Callable[[Row], None], preempted: set[int]) -> Plan:
    plan: Plan = []
    for i, row in enumerate(rows):
        if row.kv.remaining() != 1 or id(row) in preempted:
            continue
        while not kv.grow(row.kv, 1):  # out of blocks: the youngest rows (not yet planned) give theirs
            victim = next((r for r in reversed(rows[i + 1 :]) if r.kv.blocks and id(r) not in preempted), row)
            if victim.kv.blocks:
                preempt(victim)
            preempted.add(id(victim))  # a row without blocks (a one-token prompt) just waits
            if victim is row:
                break
        if id(row) not in preempted:
            plan.append((row, 1))
    budget -= len(plan)
    for row in rows:
        if budget <= 0:
            break
        if row.kv.remaining() <= 1 or id(row) in preempted:
            continue
        kv.reuse_prefix(row.kv)  # a new or preempted row: its prefix may be cached
        count = min(row.kv.remaining(), budget, kv.room(row.kv))
        if count > 0 and kv.grow(row.kv, count):
            plan.append((row, count))
            budget -= count
    return plan
