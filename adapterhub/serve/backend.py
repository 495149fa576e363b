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
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool

from ..errors import AdapterError, NoFreeSlot
from .api import ChatRequest, CompletionRequest
from .engine import Engine, Failed, Finished, Token
from .errors import ApiError, Overloaded, RequestError, UnknownAdapter

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass(frozen=True)
class Start:
    prompt_tokens: int
    replica: str


def prompts_of(engine: Engine, body: CompletionRequest | ChatRequest) -> tuple[list[list[int]], int]:
    """(token ids per prompt, max_tokens) for a request, as its endpoint defines them."""
    tokenizer = engine.tokenizer
    if isinstance(body, CompletionRequest):
        try:
            prompts = [tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in body.prompts()]
        except ValueError as error:
            raise ApiError(400, str(error), "prompt") from None
        return prompts, body.max_tokens or COMPLETION_DEFAULT_TOKENS
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"{engine.base_name}'s tokenizer has no chat template; use /v1/completions", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [prompt], body.limit() or max(engine.context - len(prompt), 1)  # OpenAI: the rest of the context


async def generate(
    engine: Engine, adapter: str | None, body: CompletionRequest | ChatRequest, replica: str, tenant: str = ""
) -> AsyncIterator[Start | tuple[int, Token | Finished]]:
    """One engine request per prompt of `body`, queued all at once against `tenant`'s share; see the
    module docstring. The requests are cancelled if the consumer stops early (a client that went
    away) or the engine's `request_timeout` passes."""
    prompts, max_tokens = await asyncio.to_thread(prompts_of, engine, body)  # long texts: off the event loop
    sampling = body.sampling(max_tokens)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def deliver(k: int, event) -> None:  # on the engine thread
        loop.call_soon_threadsafe(queue.put_nowait, (k * sampling.n, event))

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
    try:
        yield Start(sum(len(p) for p in prompts), replica)
        unfinished = len(prompts) * sampling.n
        while unfinished:
            left = None if deadline is None else deadline - loop.time()
            try:
                offset, event = await asyncio.wait_for(queue.get(), left)
            except TimeoutError:
                raise ApiError(
                    504,
                    f"the request did not finish within the server's request timeout of {timeout:g} s "
                    "(--request-timeout); ask for fewer tokens or retry later",
                ) from None
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message)
            if isinstance(event, Finished):
                unfinished -= 1
            yield offset + event.choice, event
    finally:
        engine.cancel(requests)  # a no-op for those that finished


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

    def generate(self, adapter: str | None, body: CompletionRequest | ChatRequest, tenant: str = "") -> AsyncIterator:
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

    async def health(self) -> dict:
        return {"status": "ok", "running_rows": self.engine.running_rows(), "queue_depth": self.engine.queue_depth()}

    def shutdown(self) -> None:
        self.engine.stop()  # the HTTP server drained first (uvicorn's graceful shutdown): fail what is left
