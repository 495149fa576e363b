"""What the HTTP app (app.py) serves from: a backend runs generations and manages adapters.

`LocalBackend` drives an Engine in this process (`adapterhub serve`); `ray_app.RayBackend` forwards
to Ray Serve replicas, each with its own Engine (`adapterhub serve --ray`). Both run `generate`
below next to the engine, so tokenization, limits and events are the same in either.

A generation yields `Start` (prompt tokens, the replica that runs it), then (choice index, Token or
Finished) until every choice finished; a failure raises ApiError with its HTTP status: 404 an
unknown adapter, 400 a request that can never run, 429 no room in the queue now (with the seconds
to wait), 504 past the engine's request deadline, 500/503 what the engine failed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi.concurrency import run_in_threadpool

from ..backbone import Composition
from ..errors import AdapterError, NoFreeSlot
from . import tools
from .api import ChatRequest, CompletionRequest
from .engine import Engine, Failed, Finished, PromptLogprobs, Token
from .errors import ApiError, Overloaded, RequestError, UnknownAdapter
from .logits import TokenLogprobs
from .sampling import Sampling

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass(frozen=True)
class Start:
    prompt_tokens: int
    replica: str
    prompt_texts: tuple[str, ...] = ()  # each prompt as text (echo)
    tools: bool = False  # the answer may hold tool calls (chat with tools, tool_choice other than none)
    forced: bool = False  # the answer is constrained to be tool calls (tool_choice required or named)


@dataclass(frozen=True)
class Scored:
    """A token's logprob as responses show it: its text, bytes, and the likeliest alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


def prompts_of(engine: Engine, body: CompletionRequest | ChatRequest) -> tuple[list[list[int]], int]:
    """(token ids per prompt, max_tokens) for a request, as its endpoint defines them."""
    tokenizer = engine.tokenizer
    if isinstance(body, CompletionRequest):
        try:
            prompts = [tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in body.prompts()]
        except ValueError as error:
            raise ApiError(400, str(error), "prompt") from None
        return prompts, COMPLETION_DEFAULT_TOKENS if body.max_tokens is None else body.max_tokens
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"{engine.base_name}'s tokenizer has no chat template; use /v1/completions", "messages")
    tool_list, choice = body.tool_dicts()
    try:
        text = tools.chat_prompt(tokenizer, [m.wire() for m in body.messages], tool_list, choice)
    except ValueError as error:
        raise ApiError(400, str(error), "messages") from None
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [prompt], body.limit() or max(engine.context - len(prompt), 1)  # OpenAI: the rest of the context


def _constraint(body: CompletionRequest | ChatRequest) -> tuple[tuple[str, object] | None, str | None, bool]:
    """(the grammar constraint, the field it comes from, whether it forces tool calls)."""
    if isinstance(body, ChatRequest) and body.tools:
        tool_list, choice = body.tool_dicts()
        try:
            tools.check_tools(tool_list, choice)
        except ValueError as error:
            raise ApiError(400, str(error), "tools") from None
        schema = tools.tool_call_schema(tool_list, choice)
        if schema is not None:
            if body.constraint() is not None:
                raise ApiError(
                    400, "tool_choice forces a tool call; it cannot be combined with response_format", "tool_choice"
                )
            return ("json_schema", json.dumps(schema)), "tool_choice", True
    elif isinstance(body, ChatRequest) and body.tool_choice not in (None, "none", "auto"):
        raise ApiError(400, "tool_choice names a tool but no tools were given", "tool_choice")
    asked = body.constraint()
    return (None, None, False) if asked is None else (asked[1], asked[0], False)


def _sampling(engine: Engine, body: CompletionRequest | ChatRequest, max_tokens: int) -> tuple[Sampling, bool]:
    """The engine's parameters for `body` (its grammar compiled: a bad schema is a 400 here, before
    anything is queued), and whether its answer is forced to be tool calls."""
    if isinstance(body, CompletionRequest):
        sampling = body.request_sampling(max_tokens)
    else:
        sampling = body.sampling(max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    constraint, field, forced = _constraint(body)
    if constraint is None:
        return sampling, forced
    from .grammar import Constraint, GrammarError

    try:
        compiled = engine.grammars.compile(Constraint(*constraint))
    except GrammarError as error:
        raise ApiError(400, f"{field}: {error}", field) from None
    return replace(sampling, grammar=compiled), forced


@dataclass(frozen=True)
class _Prepared:
    prompts: list[list[int]]
    sampling: Sampling
    forced: bool  # the answer is constrained to be tool calls
    texts: list[str]  # each prompt's text, for echo


def _prepare(engine: Engine, body: CompletionRequest | ChatRequest) -> _Prepared:
    """What the engine runs for `body` (on a worker thread: tokenizing, rendering, compiling grammars)."""
    prompts, max_tokens = prompts_of(engine, body)
    sampling, forced = _sampling(engine, body, max_tokens)
    echo = isinstance(body, CompletionRequest) and body.echo
    texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in body.prompts()] if echo else []
    return _Prepared(prompts, sampling, forced, texts)


async def generate(
    engine: Engine,
    adapter: str | Composition | None,
    body: CompletionRequest | ChatRequest,
    replica: str,
    tenant: str = "",
) -> AsyncIterator[Start | tuple[int, Token | Finished | PromptLogprobs]]:
    """One engine request per prompt of `body`, queued all at once against `tenant`'s share; see the
    module docstring. The requests are cancelled if the consumer stops early (a client that went
    away) or the engine's `request_timeout` passes. With best_of above n, the n choices of highest
    cumulative logprob come at the end. Logprobs come as `Scored` entries."""
    prepared = await asyncio.to_thread(_prepare, engine, body)  # long texts, grammars: off the loop
    prompts, sampling = prepared.prompts, prepared.sampling
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    rows = sampling.n

    def deliver(k: int, event) -> None:  # on the engine thread
        loop.call_soon_threadsafe(queue.put_nowait, (k * rows, event))

    try:
        requests = engine.submit_many(adapter, prompts, sampling, deliver, tenant)
    except UnknownAdapter as error:
        raise ApiError(404, str(error), "model") from None
    except RequestError as error:
        raise ApiError(400, str(error), "prompt") from None
    except Overloaded as error:
        raise ApiError(error.status, str(error), retry_after=error.retry_after) from None
    timeout = engine.limits.request_timeout
    deadline = None if timeout is None else loop.time() + timeout
    # The engine stops at the deadline even while the consumer is not reading (stuck sending to a client).
    expiry = None if deadline is None else loop.call_at(deadline, engine.cancel, requests)
    scored = _scorer(engine.tokenizer, prompts, rows)
    try:
        tooled = isinstance(body, ChatRequest) and bool(body.tools) and body.tool_choice != "none"
        yield Start(
            sum(len(p) for p in prompts),
            replica,
            tuple(prepared.texts),
            tooled,
            prepared.forced,
        )
        events = _events(queue, len(prompts) * rows, deadline, timeout, scored)
        if rows > body.n:
            events = _best(events, rows, body.n, keep_logprobs=getattr(body, "logprobs", None) is not None)
        async for index, event in events:
            yield index, event
    finally:
        if expiry is not None:
            expiry.cancel()
        engine.cancel(requests)  # a no-op for those that finished


async def _events(queue: asyncio.Queue, unfinished: int, deadline: float | None, timeout: float | None, scored):
    """(choice index, event) until every choice finished, its logprobs `scored` (while the index is still the
    engine's: prompt k's choices at k * rows); ApiError for a failure or the deadline."""
    loop = asyncio.get_running_loop()
    while unfinished:
        try:
            if deadline is not None and loop.time() >= deadline:
                # Past it (the engine stopped the request then): what arrived in time still goes out, a
                # finished answer whole; with nothing left, 504. (timeout_at fires only while get waits.)
                offset, event = queue.get_nowait()
            else:
                async with asyncio.timeout_at(deadline):  # not wait_for: on 3.11 it can swallow a cancellation
                    offset, event = await queue.get()
        except (TimeoutError, asyncio.QueueEmpty):
            raise ApiError(
                504,
                f"the request did not finish within the server's request timeout of {timeout:g} s "
                "(--request-timeout); ask for fewer tokens or retry later",
            ) from None
        if isinstance(event, Failed):
            raise ApiError(event.status, event.message)
        if isinstance(event, Finished):
            unfinished -= 1
        yield offset + event.choice, scored(offset + event.choice, event)


async def _best(events, rows: int, n: int, *, keep_logprobs: bool):
    """best_of: each prompt's `rows` choices collected, the `n` of highest cumulative logprob sent
    (re-indexed k * n + rank), as whole choices; logprobs dropped unless the request asked for them."""
    collected: dict[int, list] = {}
    async for index, event in events:
        if isinstance(event, PromptLogprobs):  # the prompt's, whichever choices win
            yield index // rows * n, event
        else:
            collected.setdefault(index, []).append(event)
    for k in range(len(collected) // rows):
        ranked = sorted(range(k * rows, (k + 1) * rows), key=lambda i: -(collected[i][-1].cumulative_logprob or 0.0))[
            :n
        ]
        for rank, index in enumerate(ranked):
            for event in collected[index]:
                yield k * n + rank, event if keep_logprobs else replace(event, logprobs=())


def _scorer(tokenizer, prompts: list[list[int]], rows: int):
    """(index, event) -> the event with its TokenLogprobs as Scored (token texts decoded once per id);
    prompt k's PromptLogprobs (index k * rows) get its first token too, unscored. A token's bytes
    are those of its decoded text (a piece of a character decodes to U+FFFD)."""

    @functools.lru_cache(maxsize=1 << 16)
    def text(token: int) -> tuple[str, tuple[int, ...]]:
        piece = tokenizer.decode([token])
        return piece, tuple(piece.encode("utf-8", "surrogatepass"))

    def one(entry: TokenLogprobs) -> Scored:
        piece, raw = text(entry.token)
        return Scored(piece, entry.logprob, raw, tuple((text(t)[0], lp, text(t)[1]) for t, lp in entry.top))

    def scored(index: int, event):
        if isinstance(event, PromptLogprobs):
            piece, raw = text(prompts[index // rows][0])
            return replace(event, entries=(Scored(piece, None, raw), *map(one, event.entries[1:])))
        if isinstance(event, Token | Finished) and event.logprobs:
            return replace(event, logprobs=tuple(map(one, event.logprobs)))
        return event

    return scored


def adapter_json(name: str, source: str, digest: str, info=None) -> dict:
    """An adapter as GET/POST /v1/adapters show it (`source`: its label, never a server path the client
    did not give; `digest`: the sha256 of its config and tensors, the same for the same files under
    any name; `info`: its AdapterInfo while resident)."""
    resident = {"type": info.type, "rank": info.rank, "slot": info.slot, "bytes": info.nbytes} if info else {}
    return {
        "id": name,
        "object": "adapter",
        "source": source,
        "digest": digest,
        "resident": info is not None,
        **resident,
    }


def source_label(source: str) -> str:
    """How listings show an adapter given on the command line: a Hub id as is, a local directory by
    its name only (its absolute path is the server's business)."""
    return os.path.basename(os.path.normpath(source)) if os.path.isabs(source) else source


class LocalBackend:
    """An Engine in this process."""

    def __init__(self, engine: Engine, delete_timeout: float = 60.0):
        self.engine, self.delete_timeout = engine, delete_timeout
        self.base_name, self.metrics = engine.base_name, engine.metrics
        self.tokenizer, self.context = engine.tokenizer, engine.context  # what /tokenize and its kin answer from
        self.replica = f"{socket.gethostname()}:{os.getpid()}"

    def generate(
        self, adapter: str | Composition | None, body: CompletionRequest | ChatRequest, tenant: str = ""
    ) -> AsyncIterator:
        return generate(self.engine, adapter, body, self.replica, tenant)

    async def adapters(self) -> list[dict]:
        listing = sorted(self.engine.listing().items())
        return [adapter_json(name, label, digest, info) for name, (label, digest, info) in listing]

    async def add_adapter(
        self, name: str, source: str, revision: str | None, label: str, root: str | None = None
    ) -> dict:
        """Loads `source` (a resolved directory or Hub id) under `name`, shown as `label`, its files
        kept inside `root`."""
        try:
            info = await run_in_threadpool(self.engine.add_adapter, name, source, revision, label=label, root=root)
        except NoFreeSlot as error:
            raise ApiError(503, f"{error} (waited {self.engine.limits.load_wait:g} s for one)", retry_after=5) from None
        except (AdapterError, OSError) as error:
            raise ApiError(422, f"adapter {name!r} was not loaded: {error}", "source") from None
        return adapter_json(name, label, info.digest, info)

    async def remove_adapter(self, name: str) -> int:
        """Forgets `name`; waits up to `delete_timeout` for its requests in flight, and returns how many
        are still running (its slot is freed when they end)."""
        try:
            return await run_in_threadpool(self.engine.remove_adapter, name, self.delete_timeout)
        except UnknownAdapter as error:
            raise ApiError(404, str(error), "name") from None

    async def compositions(self) -> dict[str, Composition]:
        return self.engine.compositions()

    async def add_composition(self, name: str, composition: Composition) -> None:
        try:
            self.engine.add_composition(name, composition)
        except UnknownAdapter as error:
            raise ApiError(404, str(error), "adapters") from None
        except AdapterError as error:
            raise ApiError(400, str(error), "body") from None

    async def remove_composition(self, name: str) -> None:
        try:
            self.engine.remove_composition(name)
        except UnknownAdapter as error:
            raise ApiError(404, str(error), "name") from None

    async def health(self) -> dict:
        return {"status": "ok", "running_rows": self.engine.running_rows(), "queue_depth": self.engine.queue_depth()}

    def shutdown(self) -> None:
        self.engine.stop()  # the HTTP server drained first (uvicorn's graceful shutdown): fail what is left
