"""The serving engine: one thread drives the Backbone, every step one forward over all rows in
flight, whatever adapters they name (iteration-level batching: a request joins at the next step
boundary and leaves the step it finishes).

A step is one packed sequence (`Backbone.use(names, lengths=...)`): one token of every row past its
prompt, then prompt chunks of newer rows until `max_step_tokens` is spent (chunked prefill: a long
prompt never stalls the others). K/V live in a paged cache (kv_cache.py): rows join, leave, share a
prompt prefix of the same adapter version and are preempted (recomputed later) without moving
anyone else's K/V.

Adapters have a public name (what clients send as `model`) and a resident name in the Backbone
("name#version"). A request is bound to the resident name when it is submitted, so replacing an
adapter (`add_adapter` on a name in use) never changes the weights a running request decodes with:
the new version loads beside the old one, and the old one is unloaded when its last request ends.
An adapter with rows in flight is pinned; the others are evicted least-recently-used by the
Backbone when a load needs a slot, and loaded again (from its host cache) when next asked for.
Loads run on worker threads and write into free slots while the engine keeps decoding; a load that
finds every slot pinned waits (up to `Limits.load_wait`) for one to drain.

Faults stay with the request that caused them: a failure while sampling or streaming one row fails
that row's request alone; a forward that fails is run again request by request, so only the
requests whose own forward fails get the error. Each failed request is answered (`Failed`) and lets
go of its adapter. Admission control (admission.py) bounds the queue by requests and prompt tokens,
with a fair share per API key.

    engine = Engine(backbone, tokenizer, base_name="SmolLM2-135M-Instruct")
    engine.add_adapter("upper", "/adapters/upper")
    request = engine.submit("upper", prompt_ids, Sampling(max_tokens=32), on_event)  # events on the engine thread
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..backbone import AdapterInfo, Backbone, Composition
from ..errors import AdapterError, NoFreeSlot
from .admission import FairQueue, Limits
from .errors import Overloaded, RequestError, UnknownAdapter
from .kv_cache import KVCache, KVState, default_budget
from .logits import RowView, TokenLogprobs, logprobs_of, penalized, process
from .metrics import Metrics
from .paged import CompiledStep, Step, use_paged_attention
from .sampling import Sampling, TextStream, next_tokens
from .scheduler import plan_step

log = logging.getLogger("adapterhub.serve")


def end_of_sequence(model, tokenizer) -> set[int]:
    """The token ids that end a generation: the model's generation config's, and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    return {e for e in eos + [tokenizer.eos_token_id] if e is not None}


@dataclass(frozen=True)
class Token:
    """Text a choice produced (may be empty when a token only completes a character later), and the
    logprobs of the tokens generated since its last event (when the request asks for logprobs)."""

    choice: int
    text: str
    logprobs: tuple[TokenLogprobs, ...] = ()
    count: int = 0  # tokens the choice has generated so far


@dataclass(frozen=True)
class Finished:
    choice: int
    reason: str  # "stop" (end of sequence, a stop string or token, or a grammar's end) or "length"
    tokens: int  # completion tokens of this choice
    token_ids: tuple[int, ...] = ()  # those tokens
    logprobs: tuple[TokenLogprobs, ...] = ()  # of the tokens not yet reported in a Token
    cumulative_logprob: float | None = None  # of all its tokens (when the request asks for logprobs)


@dataclass(frozen=True)
class PromptLogprobs:
    """Each prompt token's logprob given the tokens before it (None for the first), sent once per
    request before its first token, when the request asks for prompt logprobs."""

    entries: tuple[TokenLogprobs | None, ...]
    choice: int = 0


@dataclass(frozen=True)
class Failed:
    status: int  # the HTTP status it maps to
    message: str


Event = Token | Finished | Failed | PromptLogprobs
_NO_TOKENS = torch.empty(0, dtype=torch.long)


def public_names(message: str) -> str:
    """A Backbone message as a client may read it: resident names ('name#3') by their public names,
    without the list of every resident adapter (other tenants')."""
    return re.sub(r"; loaded: \[.*\]", "", re.sub(r"#\d+'", "'", message))


@dataclass
class Request:
    adapter: str | None  # public name (of an adapter or a composition); None = the base model or inline composition
    resident: str | None  # the Backbone name it is bound to (None: the base, or a composition)
    prompt: list[int]
    sampling: Sampling
    on_event: Callable[[Event], None]
    virtual: int = 0  # the adapter's virtual tokens, placed before the prompt
    tenant: str = ""  # who sent it (admission's fair share); "" when the server has no keys
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    unfinished: int = 0  # choices still generating
    released: bool = False  # its adapter no longer counts it as a user
    composition: Composition | None = None  # the adapters it combines, by resident name
    materialized: str | None = None  # the resident name of the composition's merged weights, once admitted

    @property
    def residents(self) -> tuple[str, ...]:
        """The resident adapters it uses (each counts it as a user): its adapter, or, once made, its
        composition's materialization and then the composition's inputs (released in this order, so
        that an input unloaded on release also unloads the materialization made from it)."""
        if self.composition is None:
            return () if self.resident is None else (self.resident,)
        return (() if self.materialized is None else (self.materialized,)) + self.composition.names

    @property
    def route(self) -> str | Composition | None:
        """What Backbone.use routes its rows with."""
        return self.materialized or self.composition or self.resident

    @functools.cached_property
    def prompt_ids(self) -> torch.Tensor:
        """The prompt as a tensor (the repetition penalty's), made once."""
        return torch.tensor(self.prompt, dtype=torch.long)

    @property
    def cost(self) -> int:
        """Its prompt tokens (what it weighs in the queue)."""
        return self.virtual + len(self.prompt)

    def cancel(self) -> None:
        """Stops generating for this request (the client went away); its rows leave at the next step."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        """Sends `event`; a receiver that fails (its client is gone) cancels the request instead of
        failing the engine thread."""
        try:
            self.on_event(event)
        except Exception:
            log.warning("a request's event could not be delivered; the request is cancelled", exc_info=True)
            self.cancelled = True


@dataclass
class _Row:
    request: Request
    choice: int
    stream: TextStream
    generator: torch.Generator | None
    kv: KVState
    matcher: object | None = None  # its grammar's state (grammar.Matcher) when the request constrains output
    count: int = 0  # tokens generated
    done: bool = False
    pending: list[TokenLogprobs] = field(default_factory=list)  # logprobs of tokens whose text is not sent yet
    cumulative: float = 0.0  # sum of its tokens' logprobs
    prompt_logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)  # prompt index -> entry (choice 0)
    history: torch.Tensor | None = None  # (capacity,) its generated ids, kept for penalties (None: no penalty)

    def view(self) -> RowView:
        """What logits.process reads of this row: its output and prompt as tensors when it is penalized."""
        if self.history is None:
            return RowView(self.request.sampling, _NO_TOKENS, _NO_TOKENS, self.count)
        return RowView(self.request.sampling, self.request.prompt_ids, self.history[: self.count], self.count)

    def remember(self, token: int) -> None:
        """Appends a generated token to `history` (doubling its capacity when full)."""
        if self.history is None:
            return
        if self.count > self.history.numel():
            self.history = torch.cat([self.history, torch.empty_like(self.history)])
        self.history[self.count - 1] = token

    @property
    def prompt_done(self) -> bool:
        """Every prompt token (and virtual token) is in the cache: the row samples at this step's end."""
        return self.kv.computed >= self.request.virtual + len(self.request.prompt)


@dataclass
class _Entry:
    source: str
    revision: str | None
    resident: str
    digest: str  # the content hash of its config and tensors: its prefix-cache version
    virtual: int = 0  # virtual tokens put before each row's prompt (prompt tuning)
    label: str = ""  # how listings show the source (never a server path the client did not give)
    root: str | None = None  # the directory its files must resolve inside, at every (re)load
    type: str = ""  # its adapter type (what a composition of it defaults to)


class Engine:
    def __init__(
        self,
        backbone: Backbone,
        tokenizer,
        *,
        base_name: str,
        max_batch: int = 64,
        max_step_tokens: int = 512,
        kv_cache_bytes: int | None = None,
        prefix_cache: bool = True,
        fair_wait: float = 1.0,
        metrics: Metrics | None = None,
        compile: str | Callable | None = None,
        limits: Limits | None = None,
    ):
        """`max_batch`: rows in flight; `max_step_tokens`: tokens per forward (every running row's
        next token first, prompt chunks in the rest); `kv_cache_bytes`: the KV pool (default: room
        for max_batch rows of the full context, at most a quarter of free memory); `compile`: a
        torch.compile backend ("inductor") to run the steps with, None: eager; `limits`: the queue's
        bounds, the request deadline and how long loads wait for a slot (admission.py)."""
        if max_step_tokens < max_batch:
            raise ValueError(f"max_step_tokens ({max_step_tokens}) must be at least max_batch ({max_batch})")
        self.backbone, self.model, self.tokenizer = backbone, backbone.model, tokenizer
        self.base_name, self.max_batch, self.max_step_tokens = base_name, max_batch, max_step_tokens
        self.fair_wait = fair_wait  # seconds a request may wait for a slot before nobody overtakes it
        self.metrics = metrics or Metrics()
        config = self.model.config
        self.vocab = self.model.get_output_embeddings().weight.size(0)
        self.context = int(getattr(config, "max_position_embeddings", None) or config.n_positions)
        with backbone.use(None):  # its probe forward waits for other threads' batches, routed as the base
            use_paged_attention(self.model)
        budget = kv_cache_bytes if kv_cache_bytes is not None else default_budget(self.model, max_batch * self.context)
        self.kv = KVCache(self.model, budget, prefix_cache=prefix_cache)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        output = self.model.get_output_embeddings()
        self._output_path = next(path for path, module in self.model.named_modules() if module is output)
        self.eos = end_of_sequence(self.model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self._lock = threading.Condition()  # guards everything below; notified when there is work
        self._adapters: dict[str, _Entry] = {}  # public name -> its current version
        self._residents: dict[str, _Entry] = {}  # resident name -> entry, retired ones too until unloaded
        self._compositions: dict[str, Composition] = {}  # registered name -> composition of public names
        self.limits = limits or Limits()
        queue_tokens = self.limits.max_queue_tokens or 8 * self.kv.tokens
        self._queue = FairQueue(self.limits.max_queue, queue_tokens)
        self._request_seconds = 1.0  # a running mean of how long requests take (Retry-After's estimate)
        self._users: Counter[str] = Counter()  # resident name -> requests submitted and not over (pinned
        #                                          while resident and > 0)
        self._retired: set[str] = set()  # replaced or deleted: unloaded when no request uses them
        self._loading: dict[str, Future] = {}
        self._versions = itertools.count(1)
        self._rows: list[_Row] = []  # engine thread only, in admission order
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="adapterhub-load")
        self._stopping = False
        self._draining = False  # stop() was called: no new requests
        self._stop_lock = threading.Lock()
        self._device = next(self.model.parameters()).device
        self._step_model = CompiledStep(self.model, compile) if compile else self.model
        self._pad = CompiledStep.PAD if compile else 0  # padding tokens per step
        self._thread = threading.Thread(target=self._loop, name="adapterhub-engine", daemon=True)
        self._grammars = None
        self._grammars_lock = threading.Lock()
        self.metrics.watch(self)

    @property
    def grammars(self):
        """The grammar engine for this tokenizer and vocabulary (grammar.Grammars), built on first use:
        requests compile their constraints with it, rows get their matchers from it."""
        with self._grammars_lock:
            if self._grammars is None:
                from .grammar import Grammars

                self._grammars = Grammars(self.tokenizer, self.vocab, self.eos)
            return self._grammars

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, drain: float = 0.0) -> None:
        """Stops taking requests, lets those in flight and queued finish for up to `drain` seconds,
        then stops the engine thread; whatever is left is answered Failed(503)."""
        with self._stop_lock:  # a signal's drain and the app's shutdown may both call it
            self._stop(drain)

    def _stop(self, drain: float) -> None:
        with self._lock:
            self._draining = True
            self._lock.wait_for(lambda: not self._queue and not self._rows, drain)
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._loader.shutdown(wait=True)
        for request in self._queue:
            self._fail(request, "the server is shutting down; retry the request", 503)
        for request in {id(row.request): row.request for row in self._rows}.values():
            self._fail(request, "the server stopped before this request finished; retry it", 503)

    # ---- adapters ------------------------------------------------------------------------
    def adapters(self) -> dict[str, AdapterInfo | None]:
        """Public name -> its resident info, or None while it is evicted (it loads again when asked for)."""
        return {name: info for name, (_, _, info) in self.listing().items()}

    def listing(self) -> dict[str, tuple[str, str, AdapterInfo | None]]:
        """Public name -> (the label its source is shown as, its content digest, its resident info or
        None), read in one go: an adapter evicted or deleted meanwhile shows as not resident, never
        as an error."""
        with self._lock:
            entries = dict(self._adapters)
        return {name: (e.label, e.digest, self._info(e.resident)) for name, e in entries.items()}

    def _digest(self, resident: str) -> str:
        """The content digest of the resident weights (the prefix cache's version of them)."""
        return self.backbone.info(resident).digest

    def _info(self, resident: str) -> AdapterInfo | None:
        try:
            return self.backbone.info(resident)
        except AdapterError:  # not resident (evicted, or unloaded by a concurrent delete)
            return None

    def add_adapter(
        self,
        name: str,
        source: str,
        revision: str | None = None,
        *,
        label: str | None = None,
        root: str | None = None,
    ) -> AdapterInfo:
        """Loads the adapter at `source` under `name` (blocking the caller, not the engine); a name in
        use is replaced: requests already bound to it finish on the old weights. When every slot is
        pinned by requests in flight, waits up to `limits.load_wait` seconds for one to drain, then
        raises NoFreeSlot. `label`: how listings show the source (default: `source`); `root`: the
        directory its files must resolve inside, at this load and every reload (None: no check)."""
        if not name or "#" in name or name == self.base_name:
            raise AdapterError(
                f"adapter name {name!r} is not allowed: use a non-empty name without '#' "
                f"that differs from the base model's {self.base_name!r}"
            )
        with self._lock:
            if name in self._compositions:
                raise AdapterError(f"{name!r} names a composition; delete it first or choose another adapter name")
        resident = f"{name}#{next(self._versions)}"
        info = self._load_waiting(resident, source, revision, root)  # pinned until it is known
        virtual = 0
        if not self.backbone.types.get(info.type).packed:  # prompt tuning: its virtual tokens lead each row
            prefix = self.backbone.virtual_tokens(resident)
            if prefix is None:
                self.backbone.unload(resident)
                raise AdapterError(
                    f"{source}: a {info.type} adapter neither runs in packed batches nor gives virtual tokens "
                    "(AdapterType.packed, ModuleSlots.virtual_tokens), so the server cannot batch it"
                )
            virtual = prefix.size(0)
        self.backbone.unpin(resident)
        with self._lock:
            if name in self._compositions:  # registered while this loaded
                self.backbone.unload(resident)
                raise AdapterError(f"{name!r} names a composition; delete it first or choose another adapter name")
            old = self._adapters.get(name)
            entry = _Entry(source, revision, resident, info.digest, virtual, label or source, root, info.type)
            self._adapters[name] = self._residents[resident] = entry
            if old is not None:
                self._retire(old.resident)
        return info

    def _load_waiting(self, resident: str, source: str, revision: str | None, root: str | None) -> AdapterInfo:
        """`_load`, waiting up to `limits.load_wait` for a slot while every slot is pinned (a request
        ending, an adapter unloaded or unpinned notifies)."""
        deadline = time.monotonic() + self.limits.load_wait
        while True:
            try:
                return self._load(resident, source, revision, root)
            except NoFreeSlot:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                with self._lock:
                    self._lock.wait(min(left, 0.5))  # woken when a request ends; rechecked at least twice a second

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

    # ---- compositions --------------------------------------------------------------------
    def compositions(self) -> dict[str, Composition]:
        """The compositions registered as model names, over public adapter names."""
        with self._lock:
            return dict(self._compositions)

    def add_composition(self, name: str, composition: Composition) -> None:
        """Registers `composition` (of public adapter names) as the model `name`; replaces one of that
        name. Its inputs must exist; when they are resident, its method is checked against their type
        now (else at its first request)."""
        with self._lock:
            if not name or "#" in name or name == self.base_name or name in self._adapters:
                raise AdapterError(
                    f"composition name {name!r} is not allowed: use a non-empty name without '#' that is "
                    "neither the base model's nor an adapter's"
                )
            try:
                self._composition(composition)
            except RequestError as error:
                raise AdapterError(str(error)) from None
            self._compositions[name] = composition

    def remove_composition(self, name: str) -> None:
        with self._lock:
            if name not in self._compositions:
                raise UnknownAdapter(f"no composition named {name!r}")
            del self._compositions[name]

    def _composition(self, adapter: str | Composition | None) -> Composition | None:
        """Under the lock: the composition a request names (inline, or registered as a model name) over
        resident names, or None for a plain adapter or the base. Raises UnknownAdapter for an input
        that does not exist, RequestError for one that cannot be composed (prompt tuning)."""
        if isinstance(adapter, str):
            adapter = self._compositions.get(adapter)
        if adapter is None:
            return None
        entries = [self._entry(name) for name in adapter.names]
        for name, entry in zip(adapter.names, entries):
            if entry.virtual:
                raise RequestError(
                    f"{name!r} puts virtual tokens before the prompt (prompt tuning): it cannot be composed"
                )
        residents = dict(zip(adapter.names, (e.resident for e in entries)))
        routed = adapter.renamed(residents.__getitem__)
        kind = entries[0].type
        methods = self.backbone.types.get(kind).composition_methods() if kind else ()
        if kind and not methods:
            raise RequestError(f"{kind} adapters cannot be composed (their type declares no composition methods)")
        method = adapter.method or (methods[0] if methods else None)  # None: counted as a merge below
        if set(routed.names) <= set(self.backbone.names):  # else checked once its inputs are loaded again
            try:
                method = self.backbone.composition_method(routed)
            except AdapterError as error:
                if set(routed.names) <= set(self.backbone.names):  # not an input evicted meanwhile
                    raise RequestError(f"the composition cannot run: {public_names(str(error))}") from None
        slots = len(routed.names) + (method != "cat")
        if slots > self.backbone.max_adapters:
            raise RequestError(
                f"the composition needs {slots} adapter slots at once (its inputs"
                f"{'' if slots == len(routed.names) else ' and their merge'}), more than the server's "
                f"{self.backbone.max_adapters}; combine fewer adapters"
            )
        return routed

    # ---- requests ------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return len(self._queue)

    def running_rows(self) -> int:
        return len(self._rows)

    def submit(
        self,
        adapter: str | Composition | None,
        prompt: list[int],
        sampling: Sampling,
        on_event: Callable[[Event], None],
        tenant: str = "",
    ) -> Request:
        """Queues a request; `on_event` is called on the engine thread with each Token, each choice's
        Finished, or one Failed. Raises UnknownAdapter, RequestError (it can never run) or
        Overloaded (no room now: retry later)."""
        return self.submit_many(adapter, [prompt], sampling, lambda _, event: on_event(event), tenant)[0]

    def submit_many(
        self,
        adapter: str | Composition | None,
        prompts: list[list[int]],
        sampling: Sampling,
        on_event: Callable[[int, Event], None],
        tenant: str = "",
    ) -> list[Request]:
        """Queues one request per prompt, all or none (`on_event(prompt index, event)`), counted
        against `tenant`'s share of the queue; see `submit`."""
        for prompt in prompts:
            if not prompt:
                raise RequestError("the prompt is empty")
            if min(prompt) < 0 or max(prompt) >= self.vocab:
                raise RequestError(f"the prompt holds token ids outside the vocabulary [0, {self.vocab})")
        if sampling.n > self.max_batch:
            raise RequestError(f"n={sampling.n} is more than the server's batch of {self.max_batch} rows")
        for what, ids in (
            ("logit_bias", [t for t, _ in sampling.logit_bias]),
            ("stop_token_ids", sampling.stop_token_ids),
        ):
            if ids and (min(ids) < 0 or max(ids) >= self.vocab):
                raise RequestError(f"{what} names token ids outside the vocabulary [0, {self.vocab})")
        with self._lock:
            if self._draining:
                raise Overloaded("the server is shutting down; retry on another replica or after it restarts", 5, 503)
            composition = self._composition(adapter)
            entry = None if adapter is None or composition is not None else self._entry(adapter)
            resident, virtual = (None, 0) if entry is None else (entry.resident, entry.virtual)
            for prompt in prompts:
                self._check_length(len(prompt), virtual, sampling.max_tokens)
            cost = sum(virtual + len(p) for p in prompts)
            waited = len(self._queue) / self.max_batch * self._request_seconds  # the queue's drain time, roughly
            self._queue.check(tenant, len(prompts), cost, waited)
            requests = [
                Request(
                    adapter,
                    resident,
                    list(prompt),
                    sampling,
                    lambda event, k=k: on_event(k, event),
                    virtual,
                    tenant,
                    unfinished=sampling.n,
                    composition=composition,
                )
                for k, prompt in enumerate(prompts)
            ]
            for request in requests:
                for name in request.residents:
                    self._users[name] += 1
                self._queue.add(request)
            if composition is not None:
                self.metrics.compositions.labels(method=composition.method or "default").inc(len(requests))
            self._lock.notify_all()
        return requests

    def cancel(self, requests: list[Request]) -> None:
        """Stops `requests` (their client went away or their deadline passed): queued ones leave the
        queue at once, running ones at the next step."""
        with self._lock:
            for request in requests:
                request.cancel()
                if request in self._queue:
                    self._queue.remove(request)
                    self._release(request)
            self._lock.notify_all()

    def _check_length(self, prompt: int, virtual: int, max_tokens: int) -> None:
        """A RequestError if the row would not fit the model's context or, alone, the KV cache."""
        tokens = f"the prompt has {prompt} tokens" + (f" after {virtual} virtual tokens" if virtual else "")
        for limit, what in ((self.context, "the model's context"), (self.kv.tokens, "the server's KV cache")):
            if virtual + prompt + max_tokens > limit:
                raise RequestError(
                    f"{tokens} and max_tokens is {max_tokens}: together more than {what} of {limit} "
                    "tokens; shorten the prompt or lower max_tokens"
                )

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
                self._join(admitted)
                self._step()
            except Exception as error:  # a fault outside any one request's (steps isolate theirs): keep serving
                log.exception("the engine's step failed outside any one request; the requests in flight get an error")
                self._fail_running(f"the batch failed: {type(error).__name__}: {error}", admitted)

    def _admit(self) -> list[Request]:
        """Takes queued requests whose adapters are resident (pinning them) while rows last, and
        starts loads for the others."""
        unforked = sum(r.request.sampling.n - 1 for r in self._rows if r.choice == 0 and r.count == 0)
        taken, rows = [], len(self._rows) + unforked  # rows in flight and the choices still to fork
        running = Counter(row.request.tenant for row in self._rows)
        for request in self._queue:
            if request.cancelled:  # all of them, so that none still counts against its key
                self._queue.remove(request)
                self._release(request)
        for request in self._queue.fair_order(running):
            if rows + request.sampling.n > self.max_batch:
                break
            overdue = time.perf_counter() - request.submitted > self.fair_wait
            evicted = self._pin_all(request.residents, taken, keep_partial=overdue)
            if evicted and overdue:  # let go of what only queued requests hold, so that its loads find slots
                self._let_go(keep=set(request.residents), taken=taken)
            if evicted and (overdue or self._fits_together(request.residents)):
                for name in evicted:
                    self._start_load(name)
            ready = not evicted and self._materialize(request)
            if not ready and not evicted and overdue and not request.released:
                self._let_go(keep=set(request.residents), taken=taken)  # no slot for its merge: take theirs
                ready = self._materialize(request)
            if request.released:  # its composition cannot run: failed
                continue
            if not ready:
                if overdue:
                    break  # admit nobody behind it, so that pinned adapters drain and a slot frees for it
                continue
            self._queue.remove(request, admitted=True)
            taken.append(request)
            rows += request.sampling.n
        return taken

    def _fits_together(self, names: tuple[str, ...]) -> bool:
        """Whether every one of `names` can be resident and pinned at once beside today's pins and
        loads: else loading some of them for a request not yet past fair_wait would only evict the
        others (a composition's inputs reloading in turn)."""
        return len(names) == 1 or self._room_for(len(names))

    def _room_for(self, adapters: int) -> bool:
        """Whether `adapters` more can be pinned beside the pinned ones and the loads still running
        (a finished load is pinned already)."""
        loading = sum(1 for future in self._loading.values() if not future.done())
        return self.backbone.pinned_count() + loading + adapters <= self.backbone.max_adapters

    def _held(self, taken: list[Request]) -> set[str]:
        """Resident names that requests in flight (or admitted in this pass) use."""
        return {name for r in [*(row.request for row in self._rows), *taken] for name in r.residents}

    def _pin_all(self, names: tuple[str, ...], taken: list[Request], keep_partial: bool) -> list[str]:
        """Pins all of `names` or none (a composition needs every input at once; pins held for part
        of one could deadlock two), unless `keep_partial` (the one request past fair_wait, whose
        loads must not evict its other inputs); returns those evicted, which must be loaded first."""
        pinned, evicted = [], []
        for name in names:
            (pinned if self._pin(name) else evicted).append(name)
        if evicted and not keep_partial:
            held = self._held(taken) | set(self._loading)
            for name in pinned:
                if name not in held:
                    with contextlib.suppress(AdapterError):
                        self.backbone.unpin(name)
        return evicted

    def _let_go(self, keep: set[str], taken: list[Request]) -> None:
        """Unpins the adapters that only queued requests hold (loaded for them, pinned until they run),
        except `keep`: a request that waited past fair_wait needs their slots for its own inputs."""
        for name in set(self._users) - self._held(taken) - set(self._loading) - keep:  # pinned for requests
            with contextlib.suppress(AdapterError):
                self.backbone.unpin(name)

    def _materialize(self, request: Request) -> bool:
        """Its composition's merged weights resident and pinned (methods other than "cat"), made on the
        engine thread (materializing is bounded: milliseconds for LoRA). False while no slot can be had;
        a composition that cannot run fails the request (400)."""
        if request.composition is None or request.materialized is not None:
            return True
        try:
            made = self.backbone.materialize(request.composition, pin=True)
        except NoFreeSlot:
            return False
        except Exception as error:  # not this request's to survive: the engine thread must
            status = 400 if isinstance(error, AdapterError) else 500
            if status == 500:
                log.exception("materializing a composition failed")
            self._fail(request, f"the composition cannot run: {public_names(str(error))}", status)
            return False
        if made is not None:
            request.materialized = made
            self._users[made] += 1
        return True

    def _pin(self, resident: str) -> bool:
        """Pins a resident adapter for its requests (until they are all over); False if evicted."""
        try:
            self.backbone.pin(resident)
            return True
        except AdapterError:  # evicted: it loads again first
            return False

    def _join(self, requests: list[Request]) -> None:
        """Admitted requests become rows (one per request; its other choices fork from it once its
        prompt is in the cache)."""
        now = time.perf_counter()
        for request in requests:
            with self._lock:
                # The digest of the weights in the slot now (pinned): a reload of changed files gets its own.
                if request.composition is not None:  # what it computes: inputs' digests, weights, method
                    key = self.backbone.composition_key(request.composition)
                else:
                    key = "" if request.resident is None else self._digest(request.resident)
            virtual = [-1 - i for i in range(request.virtual)]  # placeholders: embeddings come from the slot
            state = KVState(key, virtual + request.prompt, shares=request.sampling.prompt_logprobs is None)
            try:
                row = self._new_row(request, 0, state)
            except Exception as error:
                self._fail(request, f"the request could not start: {type(error).__name__}: {error}")
                continue
            self._rows.append(row)
            self.metrics.prompt_tokens.inc(len(request.prompt))
            self.metrics.queue_seconds.observe(now - request.submitted)

    def _new_row(self, request: Request, choice: int, kv: KVState) -> _Row:
        seed = request.sampling.seed
        generator = None
        if request.sampling.temperature > 0:
            seed = random.getrandbits(63) if seed is None else (seed + choice) % 2**64  # manual_seed's range
            generator = torch.Generator().manual_seed(seed)
        sampling = request.sampling
        matcher = None if sampling.grammar is None else self.grammars.matcher(sampling.grammar)
        row = _Row(request, choice, TextStream(self.tokenizer, sampling.stop), generator, kv, matcher)
        if penalized(sampling):
            row.history = torch.empty(max(min(sampling.max_tokens, 256), 1), dtype=torch.long)
        return row

    def _preempt(self, row: _Row) -> None:
        self.kv.free(row.kv)
        self.metrics.preemptions.inc()

    def _step(self) -> None:
        """One forward over the planned tokens of every row (a packed sequence), then sampling for
        the rows whose tokens are all in the cache. A forward that fails runs again one request at a
        time, so that only requests whose own forward fails get the error."""
        self._drop_cancelled()
        plan = plan_step(self._rows, self.kv, self.max_step_tokens, self._preempt)
        if not plan:
            return
        try:
            self._run(plan)
        except Exception as error:
            groups: dict[int, list[tuple[_Row, int]]] = {}
            for row, count in plan:
                groups.setdefault(id(row.request), []).append((row, count))
            if len(groups) == 1:
                self._fail(plan[0][0].request, f"the forward failed: {type(error).__name__}: {error}")
                log.exception("a request's forward failed; it gets an error")
                return
            log.warning("a step of %d requests failed (%r); running them one by one", len(groups), error)
            for group in groups.values():
                try:
                    self._run(group)
                except Exception as alone:
                    log.exception("a request's forward failed; it gets an error")
                    self._fail(group[0][0].request, f"the forward failed: {type(alone).__name__}: {alone}")

    def _run(self, plan: list[tuple[_Row, int]]) -> None:
        """The forward of `plan`, then its bookkeeping and sampling; only the forward may raise, and
        then nothing has changed but K/V writes a rerun repeats."""
        ids, keep, sampled, scored = [], [], [], []  # keep: places whose logits are needed
        for row, count in plan:
            start = row.kv.computed
            base = len(ids) - start  # the place of the row's token 0 in the step
            ids += row.kv.tokens[start : start + count]
            if row.choice == 0 and row.count == 0 and row.request.sampling.prompt_logprobs is not None:
                first = row.request.virtual  # where prompt token 0 is; place p's logits score token p + 1
                for place in range(max(start, first), min(start + count, first + len(row.request.prompt) - 1)):
                    scored.append((row, place + 1 - first, len(keep)))
                    keep.append(base + place)
            if start + count == len(row.kv.tokens):
                sampled.append((row, len(keep)))
                keep.append(len(ids) - 1)
        step = self.kv.step([(row.kv, count) for row, count in plan], self._pad)
        names = [None if row.request.virtual else row.request.route for row, _ in plan]
        with self._routed(names, [count for _, count in plan]), torch.inference_mode():
            # Slots on the output layer (any adapter's, ever) route every token: it must see them all.
            every = self.backbone.has_slots(self._output_path)
            logits = self._forward(ids, step, keep, self._virtual_embeddings(plan), every)
        if scored:
            self._score_prompts(scored, logits)
        for row, count in plan:
            row.kv.computed += count
            self.kv.publish(row.kv)
        self.metrics.batch_rows.observe(len(plan))
        self.metrics.step_tokens.observe(len(ids))
        if sampled:
            rows = [row for row, _ in sampled]
            if scored:
                logits = logits[torch.tensor([at for _, at in sampled], device=logits.device)]
            try:
                self._advance(*self._fork(rows, logits))
            except Exception as error:  # past the forward: the step is not run again; its sampled rows fail
                log.exception("sampling a step failed outside any one row; its sampled requests get an error")
                for request in {id(row.request): row.request for row in rows if not row.done}.values():
                    self._fail(request, f"generating failed: {type(error).__name__}: {error}")

    def _score_prompts(self, scored: list[tuple[_Row, int, int]], logits: torch.Tensor) -> None:
        """Records prompt token j's logprob (and alternatives) for each (row, j, place in logits)."""
        at = torch.tensor([i for _, _, i in scored], device=logits.device)
        tokens = torch.tensor([row.request.prompt[j] for row, j, _ in scored], device=logits.device)
        entries = logprobs_of(logits[at], tokens, [row.request.sampling.prompt_logprobs for row, _, _ in scored])
        for (row, j, _), entry in zip(scored, entries):
            row.prompt_logprobs[j] = entry

    def _routed(self, names: list[str | None], lengths: list[int]):
        """Backbone.use for a step of `lengths[i]` tokens of resident `names[i]` each, and its padding
        tokens (the base's)."""
        if self._pad:
            names, lengths = names + [None], lengths + [self._pad]
        return self.backbone.use(names, lengths=lengths)

    def _virtual_embeddings(self, plan: list[tuple[_Row, int]]) -> list[tuple[int, torch.Tensor]]:
        """(place in the step, embedding) of every virtual token the step runs."""
        out, offset = [], 0
        for row, count in plan:
            start = row.kv.computed
            if start < row.request.virtual:
                table = self.backbone.virtual_tokens(row.request.resident)  # (n, dim); pinned
                out += [(offset + i, table[start + i]) for i in range(min(count, row.request.virtual - start))]
            offset += count
        return out

    def _forward(
        self,
        ids: list[int],
        step: Step,
        keep: list[int],
        virtual: list[tuple[int, torch.Tensor]] = (),
        every: bool = False,
    ) -> torch.Tensor:
        """Logits (len(keep), vocab) fp32 at the places `keep` of the packed sequence `ids` (the
        step's tokens but its padding), whose `virtual` places hold the given embeddings instead of a
        token's. `every`: compute the output layer at every position (an adapter on it is routed per
        token) and pick `keep` after."""
        keeps = self._keeps_logits and not every
        device = self._device
        # A compiled step keeps at least `pad` logits (the last padding token's), so no size is 0 or 1.
        index = torch.tensor(keep + [step.tokens - 1] * (self._pad - len(keep)), dtype=torch.long, device=device)
        tokens = torch.tensor([ids + [0] * self._pad], device=device).clamp(min=0)  # (1, T)
        inputs = {"input_ids": tokens}
        if virtual or self._pad:  # compiled: always embeddings, so prompt-tuning steps share the graph
            embeds = self.model.get_input_embeddings()(tokens)  # (1, T, dim)
            if virtual:
                places = torch.tensor([p for p, _ in virtual], device=device)
                embeds[0, places] = torch.stack([e for _, e in virtual]).to(embeds.dtype)
            inputs = {"inputs_embeds": embeds}
        out = self._step_model(
            **inputs, use_cache=False, **step.inputs(), **({"logits_to_keep": index} if keeps else {})
        )
        logits = out.logits[0]
        return (logits[: len(keep)] if keeps else logits[index[: len(keep)]]).float()

    def _fork(self, rows: list[_Row], logits: torch.Tensor) -> tuple[list[_Row], torch.Tensor]:
        """Rows whose request asks for n > 1 choices and that just finished their prompt get their
        siblings (sharing the prompt's blocks), which sample from the same logits."""
        targets, index = [], []
        for i, row in enumerate(rows):
            targets.append(row)
            index.append(i)
            n = row.request.sampling.n
            if row.count == 0 and row.choice == 0 and n > 1:
                siblings = []
                try:
                    for c in range(1, n):
                        kv = self.kv.fork(row.kv)
                        try:
                            siblings.append(self._new_row(row.request, c, kv))
                        except Exception:
                            self.kv.free(kv)
                            raise
                except Exception as error:
                    for sibling in siblings:  # not rows yet: _fail would not free their blocks
                        self.kv.free(sibling.kv)
                    self._fail(row.request, f"the request's choices could not start: {type(error).__name__}: {error}")
                    continue
                at = self._rows.index(row) + 1
                self._rows[at:at] = siblings
                targets += siblings
                index += [i] * len(siblings)
        if len(targets) == len(rows):
            return rows, logits
        return targets, logits[torch.tensor(index, device=logits.device)]

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Samples one token per row (logits (len(rows), vocab)), sends the text, finishes rows.
        A request's prompt logprobs go out before its first token; rows that generate nothing
        (max_tokens 0: the prompt scored only) finish here."""
        for row in rows:
            if row.count == 0 and row.choice == 0 and row.request.sampling.prompt_logprobs is not None:
                entries = (None, *(row.prompt_logprobs.get(j) for j in range(1, len(row.request.prompt))))
                row.request.emit(PromptLogprobs(entries))
        try:
            for row in rows:
                if row.request.sampling.max_tokens == 0:
                    self._finish(row, "length", "")
            live = [i for i, row in enumerate(rows) if not row.done]
            if live:
                self._sample_rows([rows[i] for i in live], logits if len(live) == len(rows) else logits[live])
        finally:  # finished rows leave and free their blocks, whatever failed after them
            if any(row.done for row in rows):
                for row in rows:
                    if row.done:
                        self.kv.free(row.kv)
                self._rows = [row for row in self._rows if not row.done]

    def _sample_rows(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Samples one token per row (logits (len(rows), vocab)) and takes it (`_next`); a row whose
        sampling or streaming fails fails its request alone."""
        tokens = self._sample(rows, logits)
        try:
            entries = self._logprobs(rows, logits, tokens)
        except Exception as error:  # only the rows that asked for logprobs lose them
            log.exception("computing logprobs failed; the requests that asked for them get an error")
            entries = [None] * len(rows)
            for row in rows:
                if row.request.sampling.logprobs is not None:
                    self._fail(row.request, f"computing logprobs failed: {type(error).__name__}: {error}")
        self.metrics.tokens(len(rows))
        for row, token, entry in zip(rows, tokens, entries):
            if row.done:  # its request failed meanwhile (another of its choices)
                continue
            try:
                if isinstance(token, Exception):
                    raise token
                self._next(row, token, entry)
            except Exception as error:
                log.exception("a row failed while sampling or streaming; its request gets an error")
                self._fail(row.request, f"generating failed: {type(error).__name__}: {error}")

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int | Exception]:
        """Each row's next token, sampled for all rows at once (its penalties, bias and grammar
        applied: logits.process); if that fails, row by row, a row that fails alone getting its
        exception instead of a token."""

        def sample(index: slice, rows: list[_Row]) -> list[int]:
            views = [r.view() for r in rows]
            masked = [i for i, r in enumerate(rows) if r.matcher is not None]
            bitmask = self.grammars.fill([rows[i].matcher for i in masked]) if masked else None
            processed = process(logits[index], views, self.eos, masked, bitmask)
            return next_tokens(processed, [r.request.sampling for r in rows], [r.generator for r in rows]).tolist()

        states = [None if r.generator is None else r.generator.get_state() for r in rows]
        try:
            return sample(slice(None), rows)
        except Exception:
            log.warning("sampling %d rows failed; sampling them one by one", len(rows), exc_info=True)
        for row, state in zip(rows, states):  # rows drawn before the failure draw again from where they were
            if state is not None:
                row.generator.set_state(state)
        tokens: list[int | Exception] = []
        for i, row in enumerate(rows):
            try:
                tokens += sample(slice(i, i + 1), [row])
            except Exception as error:
                tokens.append(error)
        return tokens

    def _logprobs(self, rows: list[_Row], logits: torch.Tensor, tokens: list) -> list[TokenLogprobs | None]:
        """The chosen tokens' logprobs under the raw logits, for rows whose request asks for them."""
        asked = [
            i
            for i, (r, t) in enumerate(zip(rows, tokens))
            if r.request.sampling.logprobs is not None and isinstance(t, int)
        ]
        out: list[TokenLogprobs | None] = [None] * len(rows)
        if asked:
            index = torch.tensor(asked, dtype=torch.long, device=logits.device)
            chosen = torch.tensor([tokens[i] for i in asked], dtype=torch.long, device=logits.device)
            for i, entry in zip(
                asked, logprobs_of(logits[index], chosen, [rows[i].request.sampling.logprobs for i in asked])
            ):
                out[i] = entry
        return out

    def _next(self, row: _Row, token: int, entry: TokenLogprobs | None = None) -> None:
        """The row's next token: its text sent, the row finished at an end (of sequence, a stop
        string or token, its grammar) or its length."""
        row.count += 1
        row.kv.tokens.append(token)
        row.remember(token)
        if entry is not None:
            row.pending.append(entry)
            row.cumulative += entry.logprob
        sampling = row.request.sampling
        if (token in self.eos and not sampling.ignore_eos) or token in sampling.stop_token_ids:
            self._finish(row, "stop", row.stream.add(None))
            return
        if row.matcher is not None:
            row.matcher.accept(token)
        piece = row.stream.add(token)
        if row.stream.stopped:
            self._finish(row, "stop", piece)
        elif row.matcher is not None and row.matcher.done():
            self._finish(row, "stop", piece + row.stream.add(None))
        elif row.count >= sampling.max_tokens:
            self._finish(row, "length", piece + row.stream.add(None))
        elif piece:
            row.request.emit(Token(row.choice, piece, tuple(row.pending), row.count))
            row.pending.clear()

    def _finish(self, row: _Row, reason: str, piece: str) -> None:
        row.done = True
        if piece:
            row.request.emit(Token(row.choice, piece, tuple(row.pending), row.count))
            row.pending.clear()
        sampling = row.request.sampling
        row.request.emit(
            Finished(
                row.choice,
                reason,
                row.count,
                tuple(row.kv.tokens[len(row.kv.tokens) - row.count :]),
                tuple(row.pending),
                row.cumulative if sampling.logprobs is not None else None,
            )
        )
        row.request.unfinished -= 1
        if not row.request.unfinished:
            seconds = time.perf_counter() - row.request.submitted
            self.metrics.request_seconds.observe(seconds)
            self._request_seconds += 0.1 * (seconds - self._request_seconds)
            with self._lock:
                self._release(row.request)

    def _drop_cancelled(self) -> None:
        """Rows of cancelled requests leave (each request lets go of its adapter once)."""
        gone = [row for row in self._rows if row.request.cancelled]
        if not gone:
            return
        for row in gone:
            self.kv.free(row.kv)
        self._rows = [row for row in self._rows if not row.request.cancelled]
        with self._lock:
            for request in {id(r.request): r.request for r in gone}.values():
                self._release(request)

    def _fail(self, request: Request, message: str, status: int = 500) -> None:
        """Fails one request: its rows leave (their blocks freed), it is answered Failed once and
        lets go of its adapter; every other request goes on."""
        for row in self._rows:
            if row.request is request:
                row.done = True
                self.kv.free(row.kv)  # idempotent: a row that finished this step may be freed again
        self._rows = [row for row in self._rows if row.request is not request]
        with self._lock:
            if request in self._queue:
                self._queue.remove(request)
            if request.unfinished > 0:  # not one whose last choice finished before the error
                request.unfinished = 0
                request.emit(Failed(status, message))
            self._release(request)

    def _fail_running(self, message: str, admitted: list[Request] = ()) -> None:
        """Fails every row in flight and the requests just admitted (some may not be rows yet)."""
        requests = {id(r): r for r in [*(row.request for row in self._rows), *admitted]}.values()
        for request in requests:
            self._fail(request, message)

    # ---- bookkeeping (under self._lock) --------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        if name not in self._adapters:
            raise UnknownAdapter(f"no adapter named {name!r}; GET /v1/models lists the models your key may use")
        return self._adapters[name]

    def _release(self, request: Request) -> None:
        """The request is over: its adapter loses a user; without users it is unpinned (evictable),
        or unloaded if it was retired. Once per request, whichever way it ended."""
        if request.released:
            return
        request.released = True
        for resident in request.residents:
            self._users[resident] -= 1
            if not self._users[resident]:
                del self._users[resident]
                if resident in self._retired:
                    self._unload(resident)
                else:
                    with contextlib.suppress(AdapterError):  # evicted meanwhile: nothing to unpin
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
        with contextlib.suppress(AdapterError):  # evicted meanwhile (a load took its slot): nothing to unload
            self.backbone.unload(resident)

    def _start_load(self, resident: str) -> None:
        """Reloads an evicted adapter on a worker thread, when a slot can be freed for it."""
        if resident in self._loading or not self._room_for(1):
            return
        entry = self._residents[resident]
        future = self._loader.submit(self._load, resident, entry.source, entry.revision, entry.root)
        self._loading[resident] = future
        future.add_done_callback(lambda f: self._loaded(resident, f))

    def _loaded(self, resident: str, future: Future) -> None:
        with self._lock:
            del self._loading[resident]
            error = future.exception()
            entry = self._residents.get(resident)
            if error is not None and not isinstance(error, NoFreeSlot):
                message = public_names(str(error))
                self._fail_queued(resident, f"reloading adapter {resident.split('#')[0]!r} failed: {message}")
            elif error is None and entry is None:  # deleted (and its last request gone) while it reloaded
                with contextlib.suppress(AdapterError):
                    self.backbone.unload(resident)
            elif error is None:
                info = future.result()
                if info.digest != entry.digest:  # its files changed on disk since it was added: what runs now
                    log.warning("adapter %r reloaded from changed files (digest %s)", resident, info.digest[:12])
                    entry.digest, entry.type = info.digest, info.type
                if not self._users[resident]:  # its requests went away meanwhile
                    with contextlib.suppress(AdapterError):
                        self.backbone.unpin(resident)
            self._lock.notify_all()

    def _fail_queued(self, resident: str, message: str) -> None:
        for request in [r for r in self._queue if resident in r.residents]:
            self._queue.remove(request)
            request.unfinished = 0
            request.emit(Failed(503, message))
            self._release(request)

    def _load(self, resident: str, source: str, revision: str | None, root: str | None) -> AdapterInfo:
        """Loads into a free slot (the Backbone evicts an unpinned adapter if none is free), pinned:
        a concurrent load cannot evict it before its requests are admitted. `root`: the directory
        every file read must resolve inside (Backbone.load's containment)."""
        start = time.perf_counter()
        try:
            self.backbone.load(source, name=resident, revision=revision, pin=True, root=root)
        except Exception:
            self.metrics.loads.labels(result="error").inc()
            raise
        self.metrics.loads.labels(result="ok").inc()
        self.metrics.load_seconds.observe(time.perf_counter() - start)
        try:
            return self.backbone.info(resident)
        except AdapterError:  # evicted already (unpinned by the engine meanwhile): loaded again when asked
            raise NoFreeSlot(f"{resident} was evicted right after loading") from None
