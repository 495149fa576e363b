"""The embedding engine (`adapterhub serve --task embed`): one thread runs padded batches of an encoder
(BERT-like, `AutoModel`) whose rows each go through their own adapter, and pools each row into one
vector the way the model's sentence-transformers config says.

Pooling: pooling.py (the model's sentence-transformers config).

Requests (one per HTTP request, each holding up to MAX_INPUTS inputs) wait in admission.py's
FairQueue (a bound on requests and tokens, a fair share per key: `Overloaded` -> 429). Each batch
takes rows of the admitted requests in order, up to `max_rows` rows and `max_tokens` padded tokens
(a longer input runs alone), and runs one forward under `Backbone.use(names per row)`: rows of
different adapters and the base share it. A batch whose forward raises runs again request by
request, so only a request whose own rows fail gets the error.

Adapters have public names and versioned resident names (`name#k`), as in engine.py: a request is
bound to its version when submitted, a replaced or deleted version is unloaded when its last request
ends. Adapters are pinned only while a batch uses them; one evicted meanwhile is loaded again on the
engine thread before its batch.

    engine = EmbedEngine(backbone, tokenizer, SentenceConfig.read(base), base_name="all-MiniLM-L6-v2").start()
    engine.add_adapter("legal", "/adapters/legal")
    job = engine.submit("legal", engine.tokenize(["a text"]), on_done)  # on_done(vectors (1, dim) | Failed)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..backbone import AdapterInfo, Backbone
from ..errors import AdapterError, NoFreeSlot
from .admission import FairQueue, Limits
from .engine import Failed
from .errors import Overloaded, RequestError, UnknownAdapter
from .metrics import Metrics
from .pooling import SentenceConfig

log = logging.getLogger("adapterhub.serve")

MAX_INPUTS = 2048  # inputs in one request (OpenAI's bound)


@dataclass(eq=False)
class Job:
    """One request: its inputs' token ids, embedded row by row over one or more batches."""

    adapter: str | None  # public name; None = the base model
    resident: str | None  # the Backbone name it is bound to
    inputs: list[list[int]]
    on_done: Callable[[torch.Tensor | Failed], None]  # vectors (inputs, dim) fp32 on the CPU, or the failure
    tenant: str = ""
    submitted: float = field(default_factory=time.perf_counter)
    vectors: torch.Tensor | None = None  # (inputs, dim), filled as batches run
    next: int = 0  # the first input no batch has taken yet
    cancelled: bool = False
    done: bool = False  # answered (vectors or Failed)
    released: bool = False  # its adapter no longer counts it as a user

    @property
    def cost(self) -> int:
        """Its tokens (what it weighs in the queue)."""
        return sum(len(ids) for ids in self.inputs)

    def cancel(self) -> None:
        self.cancelled = True

    def answer(self, result: torch.Tensor | Failed) -> None:
        """Sends the result once; a receiver that fails (its client is gone) is only logged."""
        if self.done:
            return
        self.done = True
        try:
            self.on_done(result)
        except Exception:
            log.warning("an embedding request's result could not be delivered", exc_info=True)


@dataclass
class _Entry:
    source: str
    revision: str | None
    root: str | None  # the directory its files must resolve inside, at every (re)load
    resident: str
    label: str  # how listings show the source
    digest: str = ""


class EmbedEngine:
    """See the module docstring. What LocalBackend reads of an engine (tokenizer, context, metrics, limits,
    listing, add_adapter, remove_adapter, running_rows, queue_depth, stop) is as Engine has it."""

    def __init__(
        self,
        backbone: Backbone,
        tokenizer,
        config: SentenceConfig,
        *,
        base_name: str,
        max_rows: int = 64,
        max_tokens: int = 8192,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
    ):
        """`max_rows` / `max_tokens`: rows and padded tokens (rows x the longest) per forward."""
        self.backbone, self.model, self.tokenizer, self.config = backbone, backbone.model, tokenizer, config
        self.base_name, self.max_rows, self.max_tokens = base_name, max_rows, max_tokens
        self.metrics = metrics or Metrics()
        model_config = self.model.config
        self.dimensions = int(model_config.hidden_size)
        self.vocab = self.model.get_input_embeddings().num_embeddings
        limits_of = [model_config.max_position_embeddings, config.max_seq_length]
        if tokenizer.model_max_length < 10**6:  # RoBERTa's positions hold 2 more than its inputs; no limit: 1e30
            limits_of.append(tokenizer.model_max_length)
        self.context = min(int(n) for n in limits_of if n)  # the longest input served, in tokens
        self.pad_id = tokenizer.pad_token_id or 0
        self.limits = limits or Limits()
        queue_tokens = self.limits.max_queue_tokens or MAX_INPUTS * self.context
        self._queue = FairQueue(self.limits.max_queue, queue_tokens)
        self._lock = threading.Condition()  # guards the queue, adapters and users; notified when there is work
        self._adapters: dict[str, _Entry] = {}  # public name -> its current version
        self._residents: dict[str, _Entry] = {}  # resident name -> entry, retired ones too until unloaded
        self._users: Counter[str] = Counter()  # resident name -> requests submitted and not over
        self._retired: set[str] = set()  # replaced or deleted: unloaded when no request uses them
        self._versions = itertools.count(1)
        self._running: list[Job] = []  # admitted, in admission order (under the lock)
        self._request_seconds = 0.1  # a running mean of how long requests take (Retry-After's estimate)
        self._stopping = self._draining = False
        self._stop_lock = threading.Lock()
        self._device = next(self.model.parameters()).device
        self._thread = threading.Thread(target=self._loop, name="adapterhub-embed", daemon=True)
        self.metrics.registry.register(_Collector(self))

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> EmbedEngine:
        self._thread.start()
        return self

    def stop(self, drain: float = 0.0) -> None:
        """Stops taking requests, lets the others finish for up to `drain` seconds, then stops the
        engine thread; whatever is left is answered Failed(503)."""
        with self._stop_lock:
            with self._lock:
                self._draining = True
                self._lock.wait_for(lambda: not self._queue and not self._running, drain)
                self._stopping = True
                self._lock.notify_all()
            if self._thread.is_alive():
                self._thread.join()
            with self._lock:
                for job in [*self._queue, *self._running]:
                    self._fail(job, "the server is shutting down; retry the request", 503)

    # ---- adapters ------------------------------------------------------------------------
    def listing(self) -> dict[str, tuple[str, str, AdapterInfo | None]]:
        """Public name -> (its source's label, its content digest, its resident info or None)."""
        with self._lock:
            entries = dict(self._adapters)
        return {name: (e.label, e.digest, self._info(e.resident)) for name, e in entries.items()}

    def adapters(self) -> dict[str, AdapterInfo | None]:
        return {name: info for name, (_, _, info) in self.listing().items()}

    def _info(self, resident: str) -> AdapterInfo | None:
        try:
            return self.backbone.info(resident)
        except AdapterError:  # evicted, or unloaded by a concurrent delete
            return None

    def add_adapter(
        self, name: str, source: str, revision: str | None = None, *, label: str | None = None, root: str | None = None
    ) -> AdapterInfo:
        """Loads `source` under `name` (replacing a version in use: its requests finish on it); waits up
        to `limits.load_wait` for a slot while batches hold them all. `root`: see Engine.add_adapter."""
        if not name or "#" in name or name == self.base_name:
            raise AdapterError(
                f"adapter name {name!r} is not allowed: use a non-empty name without '#' "
                f"that differs from the base model's {self.base_name!r}"
            )
        entry = _Entry(source, revision, root, f"{name}#{next(self._versions)}", label or source)
        deadline = time.monotonic() + self.limits.load_wait
        while True:
            try:
                info = self._load(entry)  # pinned until it is known
                break
            except NoFreeSlot:
                if time.monotonic() > deadline:
                    raise
                with self._lock:
                    self._lock.wait(0.1)  # a batch ending lets its adapters go
        if self.backbone.virtual_tokens(entry.resident) is not None:
            self.backbone.unload(entry.resident)
            raise AdapterError(
                f"{source}: a {info.type} adapter puts virtual tokens before the input, whose pooling is not "
                "defined; embeddings take adapters that change the model's layers (LoRA, IA3, bottleneck, ...)"
            )
        entry.digest = info.digest
        self.backbone.unpin(entry.resident)
        with self._lock:
            old = self._adapters.get(name)
            self._adapters[name] = self._residents[entry.resident] = entry
            if old is not None:
                self._retire(old.resident)
        return info

    def remove_adapter(self, name: str, timeout: float | None = None) -> int:
        """Forgets `name` at once; waits up to `timeout` s for its requests and returns how many still run."""
        with self._lock:
            entry = self._entry(name)
            del self._adapters[name]
            self._retire(entry.resident)
            self._lock.wait_for(lambda: not self._users[entry.resident], timeout)
            return self._users[entry.resident]

    def _load(self, entry: _Entry) -> AdapterInfo:
        """Loads `entry`'s files into a slot, pinned (a concurrent load cannot evict it before its use)."""
        start = time.perf_counter()
        try:
            self.backbone.load(entry.source, name=entry.resident, revision=entry.revision, pin=True, root=entry.root)
        except Exception:
            self.metrics.loads.labels(result="error").inc()
            raise
        self.metrics.loads.labels(result="ok").inc()
        self.metrics.load_seconds.observe(time.perf_counter() - start)
        return self.backbone.info(entry.resident)

    # ---- requests ------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, with the model's special tokens, prepared as sentence-transformers does."""
        texts = [t.strip().lower() if self.config.lowercase else t.strip() for t in texts]
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def queue_depth(self) -> int:
        return len(self._queue)

    def running_rows(self) -> int:
        with self._lock:
            return sum(len(job.inputs) - job.next for job in self._running)

    def submit(self, adapter: str | None, inputs: list[list[int]], on_done: Callable, tenant: str = "") -> Job:
        """Queues one request; `on_done` is called once on the engine thread with its vectors (len(inputs),
        dim) or a Failed. Raises UnknownAdapter, RequestError (it can never run), Overloaded (not now)."""
        for i, ids in enumerate(inputs):
            if not ids:
                raise RequestError(f"input {i} is empty")
            if len(ids) > self.context:
                raise RequestError(
                    f"input {i} has {len(ids)} tokens, more than this model's {self.context}; shorten or split it"
                )
            if min(ids) < 0 or max(ids) >= self.vocab:
                raise RequestError(f"input {i} holds token ids outside the vocabulary [0, {self.vocab})")
        with self._lock:
            if self._draining:
                raise Overloaded("the server is shutting down; retry on another replica or after it restarts", 5, 503)
            entry = None if adapter is None else self._entry(adapter)
            job = Job(
                adapter, None if entry is None else entry.resident, [list(ids) for ids in inputs], on_done, tenant
            )
            if job.cost > self._queue.max_tokens:
                raise RequestError(
                    f"the inputs hold {job.cost} tokens, more than the server queues ({self._queue.max_tokens}, "
                    "--max-queue-tokens); send fewer inputs per request"
                )
            self._queue.check(tenant, 1, job.cost, len(self._queue) * self._request_seconds)
            if job.resident is not None:
                self._users[job.resident] += 1
            self._queue.add(job)
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Stops `job` (its client went away or its deadline passed): it leaves before its next batch."""
        with self._lock:
            job.cancel()
            self._lock.notify_all()

    # ---- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                self._admit()
                if not self._running:
                    self._lock.wait(timeout=1.0)  # woken by submit
                    continue
            try:
                self._step()
            except Exception as error:  # outside any one request's forward: keep serving
                log.exception("the embedding batch failed outside any one request")
                with self._lock:
                    for job in list(self._running):
                        self._fail(job, f"the batch failed: {type(error).__name__}: {error}")

    def _admit(self) -> None:
        """(Under the lock.) Drops cancelled requests; admits queued ones in fair order while the
        admitted hold fewer rows than a batch."""
        for job in [j for j in [*self._queue, *self._running] if j.cancelled]:
            self._fail(job, "cancelled", 499)
        rows = sum(len(job.inputs) - job.next for job in self._running)
        running = Counter(job.tenant for job in self._running)
        for job in self._queue.fair_order(running):
            if rows >= self.max_rows:
                break
            self._queue.remove(job, admitted=True)
            self._running.append(job)
            rows += len(job.inputs)
            self.metrics.queue_seconds.observe(time.perf_counter() - job.submitted)

    def _step(self) -> None:
        """One batch: rows planned, their adapters held in slots, one forward (request by request if
        it fails), the finished requests answered."""
        with self._lock:
            rows = self._plan()
        rows, held = self._hold(rows)
        try:
            if rows:
                self._run_isolated(rows)
        finally:
            for resident in held:
                with contextlib.suppress(AdapterError):
                    self.backbone.unpin(resident)
        with self._lock:
            for job in {id(job): job for job, _ in rows}.values():
                if not job.done and job.next == len(job.inputs):
                    seconds = time.perf_counter() - job.submitted
                    self.metrics.request_seconds.observe(seconds)
                    self._request_seconds += 0.1 * (seconds - self._request_seconds)
                    job.answer(job.vectors)
                    self._finish(job)
            self._lock.notify_all()

    def _plan(self) -> list[tuple[Job, int]]:
        """(request, input index) of the next batch: admitted rows in order, up to max_rows rows and
        max_tokens padded tokens (one row always)."""
        rows: list[tuple[Job, int]] = []
        longest = 0
        for job in self._running:
            for i in range(job.next, len(job.inputs)):
                longest = max(longest, len(job.inputs[i]))
                if rows and (len(rows) >= self.max_rows or (len(rows) + 1) * longest > self.max_tokens):
                    return rows
                rows.append((job, i))
                job.next = i + 1
        return rows

    def _hold(self, rows: list[tuple[Job, int]]) -> tuple[list[tuple[Job, int]], list[str]]:
        """Pins the adapters of `rows`, loading evicted ones again: (the rows that can run, the residents
        pinned). Rows from the first adapter no slot can be found for wait for the next batch."""
        held: list[str] = []
        for at, (job, _) in enumerate(rows):
            if job.resident is None or job.resident in held or job.done:
                continue
            try:
                self._pin_or_load(job.resident)
            except NoFreeSlot as error:
                with self._lock:
                    if at == 0:  # first in its batch and still no slot: it cannot run now
                        self._fail(job, f"{error}; retry", 503)
                    for later, i in rows[at:]:  # the rest wait for the next batch
                        later.next = min(later.next, i)
                rows = rows[:at]
                break
            except Exception as error:
                with self._lock:
                    for failed in {id(j): j for j, _ in rows if j.resident == job.resident}.values():
                        self._fail(failed, f"loading adapter {job.adapter!r} again failed: {error}", 503)
                continue
            held.append(job.resident)
        return [(job, i) for job, i in rows if not job.done], held

    def _pin_or_load(self, resident: str) -> None:
        try:
            self.backbone.pin(resident)
        except AdapterError:  # evicted since: its files load again
            with self._lock:
                entry = self._residents[resident]
            self._load(entry)

    def _run_isolated(self, rows: list[tuple[Job, int]]) -> None:
        """`_run`; if it raises, again request by request, each request that fails alone failed."""
        try:
            self._run(rows)
            return
        except Exception as error:
            groups: dict[int, list[tuple[Job, int]]] = {}
            for job, i in rows:
                groups.setdefault(id(job), []).append((job, i))
            if len(groups) == 1:
                log.exception("an embedding request's forward failed; it gets an error")
                with self._lock:
                    self._fail(rows[0][0], f"the forward failed: {type(error).__name__}: {error}")
                return
            log.warning("a batch of %d requests failed (%r); running them one by one", len(groups), error)
        for group in groups.values():
            try:
                self._run(group)
            except Exception as alone:
                log.exception("an embedding request's forward failed; it gets an error")
                with self._lock:
                    self._fail(group[0][0], f"the forward failed: {type(alone).__name__}: {alone}")

    def _run(self, rows: list[tuple[Job, int]]) -> None:
        """One padded forward of `rows`, each through its request's adapter; the pooled vectors are
        written into each request's `vectors`."""
        inputs = [job.inputs[i] for job, i in rows]
        longest = max(len(ids) for ids in inputs)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)  # (rows, T)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)  # (rows, T): 1 at real tokens
        for r, row in enumerate(inputs):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        with self.backbone.use([job.resident for job, _ in rows]), torch.inference_mode():
            out = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device))
            vectors = self.config.pool(out.last_hidden_state, mask).cpu()  # (rows, dim) fp32
        for (job, i), vector in zip(rows, vectors):
            if job.vectors is None:
                job.vectors = torch.empty(len(job.inputs), vector.numel())
            job.vectors[i] = vector
        self.metrics.batch_rows.observe(len(rows))
        self.metrics.step_tokens.observe(ids.numel())
        self.metrics.prompt_tokens.inc(int(mask.sum()))

    # ---- bookkeeping (under self._lock) --------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        if name not in self._adapters:
            raise UnknownAdapter(f"no adapter named {name!r}; GET /v1/models lists the models your key may use")
        return self._adapters[name]

    def _fail(self, job: Job, message: str, status: int = 500) -> None:
        """Answers `job` Failed (once), takes it out of the queue or the running requests, lets its adapter go."""
        job.answer(Failed(status, message))
        self._finish(job)

    def _finish(self, job: Job) -> None:
        if job in self._queue:
            self._queue.remove(job)
        if job in self._running:
            self._running.remove(job)
        if not job.released:
            job.released = True
            if job.resident is not None:
                self._users[job.resident] -= 1
                if not self._users[job.resident]:
                    del self._users[job.resident]
                    if job.resident in self._retired:
                        self._unload(job.resident)
        self._lock.notify_all()

    def _retire(self, resident: str) -> None:
        if self._users[resident]:
            self._retired.add(resident)
        else:
            self._unload(resident)

    def _unload(self, resident: str) -> None:
        self._retired.discard(resident)
        self._users.pop(resident, None)
        del self._residents[resident]
        with contextlib.suppress(AdapterError):  # evicted meanwhile: nothing to unload
            self.backbone.unload(resident)


class _Collector:
    """The gauges /metrics reads from an EmbedEngine at each scrape."""

    def __init__(self, engine: EmbedEngine):
        self.engine = engine

    def collect(self):
        e, bb = self.engine, self.engine.backbone
        values = [
            ("adapterhub_queue_depth", "requests waiting to join a batch", e.queue_depth()),
            ("adapterhub_running_rows", "inputs of admitted requests not yet embedded", e.running_rows()),
            ("adapterhub_adapter_slots_used", "adapter slots holding an adapter", len(bb.names)),
            ("adapterhub_adapter_slots", "adapter slots in all", bb.max_adapters),
            ("adapterhub_adapters", "adapters clients may name (resident or not)", len(e.adapters())),
        ]
        for name, doc, value in values:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("adapterhub_adapter_evictions", "adapters evicted to make room", value=bb.evictions)
