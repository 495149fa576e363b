"""Admission control: how many requests (and prompt tokens) may wait to join the batch, each API
key's fair share of that room, and the order waiting requests join in.

A request is refused (`Overloaded`: HTTP 429 with Retry-After) when its key already holds its fair
share of the queue (the room divided by the keys with requests waiting, itself counted), or when
the queue is full; a key with nothing waiting may still queue one request within its share when the
queue is full, so one tenant's burst never locks the others out (the queue then holds at most
max_requests plus one request per such key). Waiting requests join the batch round robin over keys:
the key with the fewest rows in flight first, then the one served longest ago; oldest request first
within a key.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import zip_longest
from typing import Protocol

from .errors import Overloaded, RequestError


@dataclass(frozen=True)
class Limits:
    """What one engine admits (`adapterhub serve --max-queue ...`)."""

    max_queue: int = 1024  # requests waiting to join the batch, all keys together
    max_queue_tokens: int | None = None  # prompt tokens waiting; None: 8 x the KV cache's tokens
    request_timeout: float | None = None  # seconds from submission to the last token; None: no deadline
    load_wait: float = 30.0  # seconds an adapter load waits for a slot held by requests in flight

    def __post_init__(self):
        for name in ("max_queue", "max_queue_tokens", "request_timeout", "load_wait"):
            value = getattr(self, name)
            if value is not None and value <= 0 and not (name == "load_wait" and value == 0):
                raise ValueError(f"{name} must be positive, got {value}")


class Waiting(Protocol):
    tenant: str  # who sent it: an API key's fingerprint, "" when the server has no keys
    cost: int  # its prompt tokens
    submitted: float


class FairQueue:
    """The requests waiting to join the batch, counted per key (not thread-safe: the engine's lock)."""

    def __init__(self, max_requests: int, max_tokens: int):
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self._waiting: list[Waiting] = []
        self._requests: Counter[str] = Counter()  # key -> requests waiting
        self._tokens: Counter[str] = Counter()  # key -> their prompt tokens
        self._served: dict[str, int] = {}  # key -> when it last had a request admitted (a count of admissions)
        self._admissions = 0
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[Waiting]:
        return iter(list(self._waiting))

    def __contains__(self, request: Waiting) -> bool:
        return any(r is request for r in self._waiting)

    def check(self, tenant: str, count: int, tokens: int, retry_after: float) -> None:
        """Raises Overloaded if `count` more requests of `tokens` prompt tokens from `tenant` do not
        fit now (retry after `retry_after` seconds), RequestError if they never could."""
        if count > self.max_requests:
            raise RequestError(
                f"{count} prompts in one request are more than the server queues ({self.max_requests}, "
                "--max-queue); send fewer prompts per request"
            )
        keys = len(self._requests) + (tenant not in self._requests)  # keys waiting, this one counted
        share, token_share = max(1, self.max_requests // keys), max(1, self.max_tokens // keys)
        mine, my_tokens = self._requests[tenant], self._tokens[tenant]
        full = len(self) + count > self.max_requests or self.tokens + tokens > self.max_tokens
        if full:  # only a key with nothing waiting still gets one request (within its share) in
            fits = not mine and count == 1 and tokens <= token_share
        else:  # a key's first request may be bigger than its token share while there is room
            fits = mine + count <= share and (my_tokens + tokens <= token_share or not mine)
        if not fits:
            seconds = max(1, min(60, math.ceil(retry_after)))
            raise Overloaded(
                f"the server is at capacity: {len(self)} requests ({self.tokens} prompt tokens) wait to run, "
                f"{mine} of them yours, and your key's share is {share} requests ({token_share} tokens) while "
                f"{keys} key(s) wait; retry after {seconds} s",
                seconds,
            )

    def add(self, request: Waiting) -> None:
        self._waiting.append(request)
        self._requests[request.tenant] += 1
        self._tokens[request.tenant] += request.cost
        self.tokens += request.cost

    def remove(self, request: Waiting, admitted: bool = False) -> None:
        """Takes `request` out (`admitted`: it joins the batch, which counts as its key's turn)."""
        if admitted:
            self._admissions += 1
            self._served[request.tenant] = self._admissions
        self._waiting.remove(request)
        for counter, amount in ((self._requests, 1), (self._tokens, request.cost)):
            counter[request.tenant] -= amount
            if counter[request.tenant] <= 0:
                del counter[request.tenant]
        self.tokens -= request.cost

    def fair_order(self, running: Mapping[str, int]) -> list[Waiting]:
        """The waiting requests in the order they may join: round robin over keys, the key with the
        fewest rows in flight (`running`: key -> rows) first, then the one served longest ago; oldest
        first within a key."""
        by_key: dict[str, list[Waiting]] = defaultdict(list)
        for request in self._waiting:
            by_key[request.tenant].append(request)
        if len(by_key) < 2:
            return list(self._waiting)
        keys = sorted(by_key, key=lambda k: (running.get(k, 0), self._served.get(k, 0), by_key[k][0].submitted))
        return [r for turn in zip_longest(*(by_key[k] for k in keys)) for r in turn if r is not None]
