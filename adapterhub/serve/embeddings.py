"""OpenAI's embeddings API, `POST /v1/embeddings`, and the backend that serves it on an encoder
(`adapterhub serve --task embed`: embed_engine.py).

`model` names an adapter or the base, with the same tenancy as generation (a key that may not use a
model gets 404). `input` is a string, a list of strings, token ids, or a list of token-id lists (at
most MAX_INPUTS; token ids are the model's input as is: include its special tokens, as its
tokenizer's `encode` does). Each input may hold as many tokens as the model takes (400 naming the
input past it; nothing is truncated). `encoding_format` "base64" gives each vector as base64 of its
little-endian float32 bytes; `dimensions` other than the model's is refused (400), as the server does
not shorten vectors.

The tasks answer each other's routes with a 400 saying which server to start: /v1/embeddings on a
server that generates, completions and chat (`EmbedBackend.generate`) on one that embeds.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .api import Text
from .backend import LocalBackend
from .embed_engine import MAX_INPUTS, EmbedEngine
from .engine import Failed
from .errors import ApiError, Overloaded, RequestError, UnknownAdapter
from .openapi import ERROR_RESPONSES

EMBED_ON_GENERATE = (
    "this server generates text (adapterhub serve --task generate); /v1/embeddings needs an embedding server: "
    "adapterhub serve --task embed --base <encoder directory or Hub id>"
)
GENERATE_ON_EMBED = (
    "this server computes embeddings (adapterhub serve --task embed): use POST /v1/embeddings; completions and "
    "chat need a server started with --task generate and a causal language model as --base"
)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"model": "all-MiniLM-L6-v2", "input": ["A sentence.", "Another one."]}]},
    )
    model: Text
    input: Text | list[Text] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: Text | None = None

    @field_validator("input")
    @classmethod
    def _count(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("is empty; send a string, a list of strings, token ids or lists of token ids")
        if isinstance(value, list) and not isinstance(value[0], int) and len(value) > MAX_INPUTS:
            raise ValueError(f"holds {len(value)} inputs; send at most {MAX_INPUTS} per request")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """One entry per input: texts, or token-id lists."""
        if isinstance(self.input, str) or isinstance(self.input[0], int):
            return [self.input]
        return self.input


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format "base64"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """The response (documented in the OpenAPI document; built as plain JSON)."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class EmbedBackend(LocalBackend):
    """An EmbedEngine in this process: LocalBackend's adapter loading and listing, health and shutdown
    (the engine has Engine's methods for them), `embed`, and a `generate` that refuses."""

    def __init__(self, engine: EmbedEngine, delete_timeout: float = 60.0):
        super().__init__(engine, delete_timeout)
        self.dimensions = engine.dimensions

    def generate(self, adapter, body, tenant: str = ""):
        raise ApiError(400, GENERATE_ON_EMBED, "model")

    async def compositions(self) -> dict:
        return {}  # an embedding server does not combine adapters

    async def add_composition(self, name: str, composition) -> None:
        raise ApiError(400, "an embedding server (--task embed) does not combine adapters", "name")

    async def remove_composition(self, name: str) -> None:
        raise ApiError(404, f"no composition named {name!r}", "name")

    async def embed(self, adapter: str | None, inputs: list[str] | list[list[int]], tenant: str = ""):
        """(vectors (len(inputs), dim) fp32, tokens in all); ApiError 404 an unknown adapter, 400 an input
        that can never run, 429 no room in the queue now, 504 past --request-timeout, 500/503 a failure."""
        engine: EmbedEngine = self.engine
        ids = await asyncio.to_thread(engine.tokenize, inputs) if isinstance(inputs[0], str) else inputs
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def deliver(result: torch.Tensor | Failed) -> None:  # on the engine thread
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        try:
            job = engine.submit(adapter, ids, deliver, tenant)
        except UnknownAdapter as error:
            raise ApiError(404, str(error), "model") from None
        except RequestError as error:
            raise ApiError(400, str(error), "input") from None
        except Overloaded as error:
            raise ApiError(error.status, str(error), retry_after=error.retry_after) from None
        timeout = engine.limits.request_timeout
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancellation
                result = await done
        except TimeoutError:
            raise ApiError(
                504, f"the request did not finish within the server's request timeout of {timeout:g} s; retry later"
            ) from None
        finally:
            if not job.done:  # timed out, or this task was cancelled
                engine.cancel(job)
        if isinstance(result, Failed):
            raise ApiError(result.status, result.message)
        return result, sum(len(i) for i in ids)


def add_routes(app, backend, access, sources) -> None:
    """Adds POST /v1/embeddings to `app` (any backend: on one that generates it answers 400)."""

    @app.post(
        "/v1/embeddings",
        responses={200: {"model": EmbeddingList, "description": "one vector per input, in order"}}
        | ERROR_RESPONSES[400, 401, 403, 404, 413, 429, 500, 503, 504],
    )
    async def embeddings(body: EmbeddingRequest, request: Request):
        access.authorize(request, body.model)
        if not isinstance(backend, EmbedBackend):
            raise ApiError(400, EMBED_ON_GENERATE, "model")
        if body.dimensions not in (None, backend.dimensions):
            raise ApiError(
                400,
                f"dimensions: this model's embeddings have {backend.dimensions} dimensions and the server does not "
                f"shorten them; omit dimensions or send {backend.dimensions}",
                "dimensions",
            )
        adapter = None if body.model == backend.base_name else body.model
        vectors, tokens = await backend.embed(adapter, body.inputs(), access.tenant(request))
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": e}
                    for i, e in enumerate(_encoded(vectors, body.encoding_format))
                ],
                "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def _encoded(vectors: torch.Tensor, encoding: str) -> list[list[float]] | list[str]:
    """vectors (n, dim) fp32 as float lists, or as base64 of their little-endian float32 bytes."""
    if encoding == "float":
        return vectors.tolist()
    return [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors.numpy()]
