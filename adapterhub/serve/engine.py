"""The serving engine: one thread drives the Backbone, every decode step one forward over all rows
in flight, whatever adapters they name (iteration-level batching: a request joins at the next step
boundary and leaves the step it finishes).

Adapters have a public name (what clients send as `model`) and a resident name in the Backbone
("name#version"). A request is bound to the resident name when it is submitted, so replacing an
adapter (`add_adapter` on a name in use) never changes the weights a running request decodes with:
the new version loads beside the old one, and the old one is unloaded when its last request ends.
An adapter with rows in flight is pinned; the others are evicted least-recently-used by the
Backbone when a load needs a slot, and loaded again (from its host cache) when next asked for.
Loads run on worker threads and write into free slots while the engine keeps decoding.

    engine = Engine(backbone, tokenizer, base_name="SmolLM2-135M-Instruct")
    engine.add_adapter("upper", "/adapters/upper")
    request = engine.submit("upper", prompt_ids, Sampling(max_tokens=32), on_event)  # events on the engine thread
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..backbone import AdapterInfo, Backbone
from ..errors import AdapterError, NoFreeSlot
from .batch import RunningBatch, prefill
from .errors import RequestError, UnknownAdapter
from .metrics import Metrics
from .sampling import Sampling, TextStream, next_tokens

log = logging.getLogger("adapterhub.serve")

NOT_SERVED = {
    "prompt_tuning": "prompt tuning adds virtual tokens to the sequence, which the server's "
    "continuous batching does not support yet; serve it with Backbone.use and generate()"
}


def end_of_sequence(model, tokenizer) -> set[int]:
    """The token ids that end a generation: the model's generation config's, and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    return {e for e in eos + [tokenizer.eos_token_id] if e is not None}


@dataclass(frozen=True)
class Token:
    """Text a choice produced (may be empty when a token only completes a character later)."""

    choice: int
    text: str


@dataclass(frozen=True)
class Finished:
    choice: int
    reason: str  # "stop" (end of sequence or a stop string) or "length"
    tokens: int  # completion tokens of this choice


@dataclass(frozen=True)
class Failed:
    status: int  # the HTTP status it maps to
    message: str


Event = Token | Finished | Failed


@dataclass
class Request:
    adapter: str | None  # public name; None = the base model
    resident: str | None  # the Backbone name it is bound to
    prompt: list[int]
    sampling: Sampling
    on_event: Callable[[Event], None]
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    unfinished: int = 0  # choices still generating

    def cancel(self) -> None:
        """Stops generating for this request (the client went away); its rows leave at the next step."""
        self.cancelled = True


@dataclass
class _Row:
    request: Request
    choice: int
    stream: TextStream
    generator: torch.Generator | None
    last: int = 0
    count: int = 0
    done: bool = False


@dataclass
class _Entry:
    source: str
    revision: str | None
    resident: str


class Engine:
    def __init__(
        self,
        backbone: Backbone,
        tokenizer,
        *,
        base_name: str,
        max_batch: int = 64,
        max_prefill_tokens: int = 4096,
        fair_wait: float = 1.0,
        metrics: Metrics | None = None,
    ):
        self.backbone, self.model, self.tokenizer = backbone, backbone.model, tokenizer
        self.base_name, self.max_batch, self.max_prefill_tokens = base_name, max_batch, max_prefill_tokens
        self.fair_wait = fair_wait  # seconds a request may wait for a slot before nobody overtakes it
        self.metrics = metrics or Metrics()
        self.metrics.watch(self)
        config = self.model.config
        self.vocab = self.model.get_output_embeddings().weight.size(0)
        self.context = int(getattr(config, "max_position_embeddings", None) or config.n_positions)
        self.eos = end_of_sequence(self.model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self._lock = threading.Condition()  # guards everything below; notified when there is work
        self._adapters: dict[str, _Entry] = {}  # public name -> its current version
        self._residents: dict[str, _Entry] = {}  # resident name -> entry, retired ones too until unloaded
        self._queue: deque[Request] = deque()
        self._users: Counter[str] = Counter()  # resident name -> requests submitted and not over (pinned
        #                                          while resident and > 0)
        self._retired: set[str] = set()  # replaced or deleted: unloaded when no request uses them
        self._loading: dict[str, Future] = {}
        self._versions = itertools.count(1)
        self._rows: list[_Row] = []  # engine thread only, in the running batch's row order
        self._batch = RunningBatch()
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="adapterhub-load")
        self._stopping = False
        self._device = next(self.model.parameters()).device
        self._thread = threading.Thread(target=self._loop, name="adapterhub-engine", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join()
        self._loader.shutdown(wait=True)

    # ---- adapters ------------------------------------------------------------------------
    def adapters(self) -> dict[str, AdapterInfo | None]:
        """Public name -> its resident info, or None while it is evicted (it loads again when asked for)."""
        with self._lock:
            entries = dict(self._adapters)
        resident = set(self.backbone.names)
        return {name: self.backbone.info(e.resident) if e.resident in resident else None for name, e in entries.items()}

    def source_of(self, name: str) -> str:
        with self._lock:
            return self._entry(name).source

    def add_adapter(self, name: str, source: str, revision: str | None = None) -> AdapterInfo:
        """Loads the adapter at `source` under `name` (blocking the caller, not the engine); a name in
        use is replaced: requests already bound to it finish on the old weights."""
        if not name or "#" in name or name == self.base_name:
            raise AdapterError(
                f"adapter name {name!r} is not allowed: use a non-empty name without '#' "
                f"that differs from the base model's {self.base_name!r}"
            )
        resident = f"{name}#{next(self._versions)}"
        info = self._load(resident, source, revision)  # pinned until it is known
        if info.type in NOT_SERVED:
            self.backbone.unload(resident)
            raise AdapterError(f"{source}: a {info.type} adapter; {NOT_SERVED[info.type]}")
        self.backbone.unpin(resident)
        with self._lock:
            old = self._adapters.get(name)
            self._adapters[name] = self._residents[resident] = _Entry(source, revision, resident)
            if old is not None:
                self._retire(old.resident)
        return info

    def remove_adapter(self, name: str, timeout: float | None = None) -> int:
        """Forgets `name` at once (new requests for it get UnknownAdapter); its slot is freed when its
        last request in flight ends. Waits up to `timeout` seconds for that (None: as long as it takes,
        0: not at all) and returns how many of its requests are still in flight (0: unloaded)."""
        with self._lock:
            entry = self._entry(name)
            del self._adapters[name]
            self._retire(entry.resident)
            self._lock.wait_for(lambda: not self._users[entry.resident], timeout)
            return self._users[entry.resident]

    # ---- requests ------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return len(self._queue)

    def running_rows(self) -> int:
        return len(self._rows)

    def submit(
        self, adapter: str | None, prompt: list[int], sampling: Sampling, on_event: Callable[[Event], None]
    ) -> Request:
        """Queues a request; `on_event` is called on the engine thread with each Token, each choice's
        Finished, or one Failed."""
        if not prompt:
            raise RequestError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise RequestError(f"the prompt holds token ids outside the vocabulary [0, {self.vocab})")
        if len(prompt) + sampling.max_tokens > self.context:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {sampling.max_tokens}: "
                f"together more than the model's context of {self.context} tokens; shorten the "
                "prompt or lower max_tokens"
            )
        if sampling.n > self.max_batch:
            raise RequestError(f"n={sampling.n} is more than the server's batch of {self.max_batch} rows")
        with self._lock:
            resident = None if adapter is None else self._entry(adapter).resident
            request = Request(adapter, resident, list(prompt), sampling, on_event, unfinished=sampling.n)
            if resident is not None:
                self._users[resident] += 1
            self._queue.append(request)
            self._lock.notify_all()
        return request

    # ---- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    break
                admitted = self._admit()
                if not admitted and not self._rows:
                    self._lock.wait(timeout=1.0)  # woken by submit, a finished load or request
                    continue
            try:
                if admitted:
                    self._prefill(admitted)
                if self._rows:
                    self._decode()
            except Exception as error:  # out of memory, a kernel error: fail what is in flight, keep serving
                log.exception("a batch failed; its requests get an error")
                self._fail_running(f"the batch failed: {type(error).__name__}: {error}")

    def _admit(self) -> list[Request]:
        """Takes queued requests whose adapters are resident (pinning them) while rows and prefill
        budget last, and starts loads for the others."""
        taken, rows, tokens = [], len(self._rows), 0
        for request in list(self._queue):
            if request.cancelled:
                self._queue.remove(request)
                self._release(request)
                continue
            if rows + request.sampling.n > self.max_batch or (
                taken and tokens + len(request.prompt) > self.max_prefill_tokens
            ):
                break
            if request.resident is not None and not self._pin(request.resident):
                self._start_load(request.resident)
                if time.perf_counter() - request.submitted > self.fair_wait:
                    break  # admit nobody behind it, so that pinned adapters drain and a slot frees for it
                continue
            self._queue.remove(request)
            taken.append(request)
            rows += request.sampling.n
            tokens += len(request.prompt)
        return taken

    def _pin(self, resident: str) -> bool:
        """Pins a resident adapter for its requests (until they are all over); False if evicted."""
        try:
            self.backbone.pin(resident)
            return True
        except AdapterError:  # evicted: it loads again first
            return False

    def _prefill(self, requests: list[Request]) -> None:
        with self.backbone.use([r.resident for r in requests]), torch.inference_mode():
            cache, mask, logits = prefill(self.model, [r.prompt for r in requests], self.pad_id)
        repeat = [i for i, r in enumerate(requests) for _ in range(r.sampling.n)]
        if len(repeat) > len(requests):  # n > 1: each choice gets its own copy of its prompt's cache
            joining = RunningBatch()
            joining.join(cache, mask)
            joining.keep(repeat)
            cache, mask = joining.cache, joining.mask
        self._batch.join(cache, mask)
        rows = [self._new_row(r, choice) for r in requests for choice in range(r.sampling.n)]
        self._rows.extend(rows)
        now = time.perf_counter()
        for r in requests:
            self.metrics.prompt_tokens.inc(len(r.prompt))
            self.metrics.queue_seconds.observe(now - r.submitted)
        self._advance(rows, logits[torch.tensor(repeat)])

    def _new_row(self, request: Request, choice: int) -> _Row:
        seed = request.sampling.seed
        generator = None
        if request.sampling.temperature > 0:
            generator = torch.Generator().manual_seed(random.getrandbits(63) if seed is None else seed + choice)
        return _Row(request, choice, TextStream(self.tokenizer, request.sampling.stop), generator)

    def _decode(self) -> None:
        live = [i for i, row in enumerate(self._rows) if not row.request.cancelled]
        if len(live) < len(self._rows):
            self._drop([row for row in self._rows if row.request.cancelled])
            self._keep(live)
            if not self._rows:
                return
        tokens = torch.tensor([row.last for row in self._rows], device=self._device)
        with self.backbone.use([row.request.resident for row in self._rows]), torch.inference_mode():
            logits = self._batch.decode(self.model, tokens)
        self.metrics.batch_rows.observe(len(self._rows))
        self._advance(self._rows, logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Samples one token per row (logits (len(rows), vocab)), sends the text, finishes rows."""
        tokens = next_tokens(
            logits,
            [r.request.sampling.temperature for r in rows],
            [r.request.sampling.top_p for r in rows],
            [r.generator for r in rows],
        ).tolist()
        self.metrics.tokens(len(rows))
        for row, token in zip(rows, tokens):
            row.last, row.count = token, row.count + 1
            sampling = row.request.sampling
            if token in self.eos and not sampling.ignore_eos:
                self._finish(row, "stop", row.stream.add(None))
                continue
            piece = row.stream.add(token)
            if row.stream.stopped:
                self._finish(row, "stop", piece)
            elif row.count >= sampling.max_tokens:
                self._finish(row, "length", piece + row.stream.add(None))
            elif piece:
                row.request.on_event(Token(row.choice, piece))
        finished = [i for i, row in enumerate(self._rows) if row.done]
        if finished:
            self._keep([i for i, row in enumerate(self._rows) if not row.done])

    def _finish(self, row: _Row, reason: str, piece: str) -> None:
        row.done = True
        if piece:
            row.request.on_event(Token(row.choice, piece))
        row.request.on_event(Finished(row.choice, reason, row.count))
        row.request.unfinished -= 1
        if not row.request.unfinished:
            self.metrics.request_seconds.observe(time.perf_counter() - row.request.submitted)
            with self._lock:
                self._release(row.request)

    def _keep(self, rows: list[int]) -> None:
        self._batch.keep(rows)
        self._rows = [self._rows[i] for i in rows]

    def _drop(self, rows: list[_Row]) -> None:
        """Rows of cancelled requests: each request lets go of its adapter once."""
        with self._lock:
            for request in {id(r.request): r.request for r in rows}.values():
                self._release(request)

    def _fail_running(self, message: str) -> None:
        requests = {id(r.request): r.request for r in self._rows}.values()
        self._rows, self._batch = [], RunningBatch()
        with self._lock:
            for request in requests:
                request.on_event(Failed(500, message))
                self._release(request)

    # ---- bookkeeping (under self._lock) --------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        if name not in self._adapters:
            raise UnknownAdapter(f"no adapter named {name!r}; available: {[self.base_name, *sorted(self._adapters)]}")
        return self._adapters[name]

    def _release(self, request: Request) -> None:
        """The request is over: its adapter loses a user; without users it is unpinned (evictable),
        or unloaded if it was retired."""
        resident = request.resident
        if resident is not None:
            self._users[resident] -= 1
            if not self._users[resident]:
                del self._users[resident]
                if resident in self._retired:
                    self._unload(resident)
                elif resident in self.backbone.names:
                    self.backbone.unpin(resident)
        self._lock.notify_all()

    def _retire(self, resident: str) -> None:
        if self._users[resident]:
            self._retired.add(resident)
        else:
            self._unload(resident)

    def _unload(self, resident: str) -> None:
        self._retired.discard(resident)
        del self._residents[resident]
        if resident in self.backbone.names:
            self.backbone.unload(resident)

    def _start_load(self, resident: str) -> None:
        """Reloads an evicted adapter on a worker thread, when a slot can be freed for it."""
        pinned = len(set(self._users) & set(self.backbone.names))
        if resident in self._loading or pinned + len(self._loading) >= self.backbone.max_adapters:
            return
        entry = self._residents[resident]
        future = self._loader.submit(self._load, resident, entry.source, entry.revision)
        self._loading[resident] = future
        future.add_done_callback(lambda f: self._loaded(resident, f))

    def _loaded(self, resident: str, future: Future) -> None:
        with self._lock:
            del self._loading[resident]
            error = future.exception()
            if error is not None and not isinstance(error, NoFreeSlot):
                self._fail_queued(resident, f"reloading adapter {resident.split('#')[0]!r} failed: {error}")
            elif error is None and not self._users[resident]:  # its requests went away meanwhile
                self.backbone.unpin(resident)
            self._lock.notify_all()

    def _fail_queued(self, resident: str, message: str) -> None:
        for request in [r for r in self._queue if r.resident == resident]:
            self._queue.remove(request)
            request.on_event(Failed(503, message))
            self._release(request)

    def _load(self, resident: str, source: str, revision: str | None) -> AdapterInfo:
        """Loads into a free slot (the Backbone evicts an unpinned adapter if none is free), pinned:
        a concurrent load cannot evict it before its requests are admitted."""
        start = time.perf_counter()
        try:
            self.backbone.load(source, name=resident, revision=revision, pin=True)
        except Exception:
            self.metrics.loads.labels(result="error").inc()
            raise
        self.metrics.loads.labels(result="ok").inc()
        self.metrics.load_seconds.observe(time.perf_counter() - start)
        return self.backbone.info(resident)
