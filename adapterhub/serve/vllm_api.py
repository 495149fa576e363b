"""vLLM's and LoRAX's endpoints and adapter APIs beside ours (docs/openai-compat.md lists every field):

- `GET /v1/models/{model}`: one entry as `/v1/models` lists it;
- vLLM's `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`: our adapter loading and deletion,
  answered as vLLM answers them (plain-text success, 400 for a name already loaded without `load_inplace`,
  404 for unloading an unknown name);
- vLLM's `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`, which lm-evaluation-harness's
  remote tokenizer (`tokenizer_backend="remote"`, picked by `local-completions` on its own) is built on;
- `lorax_model`: LoRAX's per-request `adapter_id` / `adapter_source`, loading an adapter just in time.

Every check is our own routes': loading and unloading are the admin's (a "*" key), sources only what
`tenancy.Sources` allows, and a model the key may not use is answered exactly as one that does not exist.
Adapters share the base model's tokenizer, so `model` in the tokenizer routes only has to be one the key
may use. Under Ray the ingress has no engine: `RayBackend` asks a replica for the tokenizer once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import AdapterError
from .access import Access
from .api import Message, Text
from .errors import ApiError
from .openapi import ERROR_RESPONSES
from .tenancy import Sources

LORAX_SOURCES = ("hub", "local")  # LoRAX's adapter_source values this server loads from ("s3", "pbase": not)
JIT_NAME = re.compile(r"[^#@\s\x00]+")  # AdapterUpload.name's rule but '/' (Hub ids hold one): '#', '@' mark versions
PLAIN_TEXT_OK = {
    200: {"description": "done: vLLM's plain-text answer", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


def _no_model(model: str) -> str:
    """The 404 message for a model that is not served or that the key may not use: the same for both,
    and the same as access.Access.authorize's, so that a tenant cannot tell them apart."""
    return f"no model named {model!r}; GET /v1/models lists the models your key may use"


class _NameLocks:
    """One asyncio.Lock per adapter name, kept only while someone holds or waits for it: loads and unloads of
    one name (vLLM's routes, LoRAX's loads just in time) run one at a time, and a second request for an adapter
    being loaded finds it loaded instead of loading it again."""

    def __init__(self):
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        self._users[name] += 1
        try:
            async with lock:
                yield
        finally:
            self._users[name] -= 1
            if not self._users[name]:
                del self._users[name], self._locks[name]


_LOCKS: weakref.WeakKeyDictionary[Any, _NameLocks] = weakref.WeakKeyDictionary()


def _locks(backend) -> _NameLocks:
    """The name locks of `backend` (shared by its app's routes and lorax_model)."""
    return _LOCKS.setdefault(backend, _NameLocks())


async def _adapter_names(backend) -> set[str]:
    return {a["id"] for a in await backend.adapters()}


async def _check_model(backend, access: Access, request: Request, model: str | None) -> None:
    """A `model` the key may use and the server serves, else 404 (the same answer for both); without a model
    (lm-eval's remote tokenizer names none), a key any tenant holds."""
    if model is None:
        access.known_key(request)
        return
    access.authorize(request, model)
    if model != backend.base_name and model not in await _adapter_names(backend):
        raise ApiError(404, _no_model(model), "model")


async def _tokenizer(backend) -> tuple[Any, int]:
    """The backend's tokenizer and context length; a RayBackend asks a replica for them the first time."""
    if backend.tokenizer is None:
        await backend.fetch_tokenizer()
    return backend.tokenizer, backend.context


async def _add(backend, name: str, source: str, label: str, sources: Sources, param: str) -> None:
    """backend.add_adapter, its 422 naming `param` (the request's field that gave the source)."""
    try:
        await backend.add_adapter(name, source, None, label, sources.root_of(source))
    except ApiError as error:
        if error.param != "source":
            raise
        raise ApiError(error.status, str(error), param, error.retry_after) from None


def _unrooted(error: Exception, sources: Sources) -> str:
    """The error's message without the server's --adapter-dir path (any tenant may cause this load)."""
    message = str(error)
    if sources.adapter_dir is not None:  # absolute forms only, longest first (one may hold the other)
        roots = {os.path.abspath(sources.adapter_dir), os.path.realpath(sources.adapter_dir)}
        for root in sorted(roots, key=len, reverse=True):
            message = message.replace(f" ({root})", "").replace(root, "--adapter-dir")
    return message


async def lorax_model(
    backend, access: Access, sources: Sources, request: Request, adapter_id: str, adapter_source: str | None
) -> str:
    """The model a generation with LoRAX's `adapter_id` (and `adapter_source`: "hub", LoRAX's default, or
    "local") runs on: `adapter_id` itself, loaded under that name first if it is not loaded yet, from a
    directory under --adapter-dir ("local") or a Hub repo (with --allow-hub). Only a key allowed to use that
    name may cause the load (any other gets the 404 of an unknown model); concurrent requests for one new
    adapter load it once. 400 for another adapter_source ("s3", "pbase"); 422 for an adapter that cannot be
    loaded, or that is not where adapter_source says."""
    kind = "hub" if adapter_source is None else adapter_source
    if kind not in LORAX_SOURCES:
        raise ApiError(
            400,
            f"adapter_source {adapter_source!r} is not supported by this server; use 'local' (a directory under "
            "--adapter-dir) or 'hub' (a Hub repo id, with --allow-hub)",
            "adapter_source",
        )
    access.authorize(request, adapter_id)
    if adapter_id == backend.base_name or adapter_id in await _adapter_names(backend):
        return adapter_id
    if not JIT_NAME.fullmatch(adapter_id):
        raise ApiError(400, f"adapter_id {adapter_id!r}: a name to load holds no '#', '@', spaces or NUL", "adapter_id")
    async with _locks(backend).hold(adapter_id):
        if adapter_id in await _adapter_names(backend):  # a request before this one loaded it
            return adapter_id
        try:
            source = sources.resolve(adapter_id)
        except AdapterError as error:
            raise ApiError(
                422, f"adapter {adapter_id!r} was not loaded: {_unrooted(error, sources)}", "adapter_id"
            ) from None
        if os.path.isabs(source) != (kind == "local"):
            where = (
                f"'local' names a directory under --adapter-dir, and there is none named {adapter_id!r}"
                if kind == "local"
                else f"'hub' names a Hub repo id, and {adapter_id!r} is a directory under --adapter-dir: "
                "send adapter_source 'local'"
            )
            raise ApiError(422, f"adapter {adapter_id!r} was not loaded: adapter_source {where}", "adapter_source")
        try:
            await _add(backend, adapter_id, source, adapter_id, sources, "adapter_id")
        except ApiError as error:
            raise ApiError(error.status, _unrooted(error, sources), error.param, error.retry_after) from None
    return adapter_id


class LoadLoraAdapter(BaseModel):
    """vLLM's POST /v1/load_lora_adapter: `lora_path` (a directory under --adapter-dir, or a Hub id with
    --allow-hub) under `lora_name`; a name already loaded needs `load_inplace` to be replaced."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"lora_name": "support", "lora_path": "support", "load_inplace": True}]},
    )
    lora_name: Text = Field(min_length=1, max_length=256, pattern=r"^[^#@/\s\x00]+$")  # AdapterUpload.name's rule
    lora_path: Text = Field(min_length=1, max_length=1024)
    load_inplace: bool = False


class UnloadLoraAdapter(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter; `lora_int_id` is accepted and not used, as vLLM does."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{"lora_name": "support"}]})
    lora_name: Text = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize: `prompt` (its tokens as /v1/completions counts them) or `messages` (as
    /v1/chat/completions renders them with the chat template)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"model": "SmolLM2-135M-Instruct", "prompt": "Hello"}]},
    )
    model: Text | None = None
    prompt: Text | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # vLLM's default: true for a prompt, false for messages
    add_generation_prompt: bool | None = None  # messages only; vLLM's default: true
    continue_final_message: bool = False  # messages only
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.prompt is not None and (self.add_generation_prompt is not None or self.continue_final_message):
            raise ValueError("add_generation_prompt and continue_final_message go with messages, not prompt")
        if self.continue_final_message and self.add_generation_prompt is not False:
            raise ValueError("continue_final_message needs add_generation_prompt false (its default is true)")
        return self

    def ids(self, tokenizer, base_name: str) -> list[int]:
        """The token ids of the prompt or the rendered messages."""
        if self.prompt is not None:
            special = self.add_special_tokens is not False
            return tokenizer(self.prompt, add_special_tokens=special)["input_ids"]
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"{base_name}'s tokenizer has no chat template; send a prompt", "messages")
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.text()} for m in self.messages],
            add_generation_prompt=self.add_generation_prompt is not False,
            continue_final_message=self.continue_final_message,
            tokenize=False,
        )
        return tokenizer(text, add_special_tokens=bool(self.add_special_tokens))["input_ids"]


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"model": "SmolLM2-135M-Instruct", "tokens": [1]}]}
    )
    model: Text | None = None
    tokens: list[int]


def tokenizer_info(tokenizer) -> dict:
    """vLLM's /tokenizer_info: the tokenizer's init arguments (its tokenizer_config.json) as JSON, with its
    class, its special tokens and chat template (lm-eval reads eos_token, bos_token and chat_template), less
    what names files on the server (`name_or_path`, `*_file`)."""
    kwargs = getattr(tokenizer, "init_kwargs", None) or {}
    info = _jsonable({k: v for k, v in kwargs.items() if k != "name_or_path" and not k.endswith("_file")})
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        info[name] = getattr(tokenizer, name, None)
    info["tokenizer_class"] = type(tokenizer).__name__
    if getattr(tokenizer, "chat_template", None):
        info["chat_template"] = tokenizer.chat_template
    return info


_OMIT = object()


def _jsonable(value: object) -> Any:
    """`value` as JSON holds it (an AddedToken as its text, as vLLM gives it); _OMIT for what JSON cannot hold."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _OMIT
    if isinstance(getattr(value, "content", None), str):  # tokenizers.AddedToken
        return value.content
    if isinstance(value, dict):
        items = ((str(k), _jsonable(v)) for k, v in value.items())
        return {k: v for k, v in items if v is not _OMIT}
    if isinstance(value, (list, tuple)):
        return [v for v in map(_jsonable, value) if v is not _OMIT]
    return _OMIT


def add_routes(app: FastAPI, backend, access: Access, sources: Sources) -> None:
    """Adds this module's routes to `app` (create_app's)."""
    locks = _locks(backend)
    listing = next(r.endpoint for r in app.routes if getattr(r, "path", None) == "/v1/models")

    @app.get("/v1/models/{model:path}", responses=ERROR_RESPONSES[401, 404])
    async def model(model: str, request: Request):
        """One model as GET /v1/models lists it (names may hold '.' and '/')."""
        entry = next((m for m in (await listing(request))["data"] if m["id"] == model), None)
        if entry is None:
            raise ApiError(404, _no_model(model), "model")
        return entry

    @app.post(
        "/v1/load_lora_adapter",
        response_class=Response,  # errors documented as JSON; the success is text (PLAIN_TEXT_OK)
        responses=PLAIN_TEXT_OK | ERROR_RESPONSES[400, 401, 403, 413, 422, 503],
    )
    async def load_lora_adapter(body: LoadLoraAdapter, request: Request):
        """Loads (with load_inplace, replaces: requests in flight finish on the old weights) an adapter."""
        access.authorize(request, None)
        name = body.lora_name
        if name == backend.base_name:
            raise ApiError(400, f"{name!r} is the base model's name; choose another", "lora_name")
        async with locks.hold(name):
            if not body.load_inplace and name in await _adapter_names(backend):
                raise ApiError(
                    400,
                    f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                    "place, set 'load_inplace' to True.",
                    "lora_name",
                )
            try:
                source = sources.resolve(body.lora_path)
            except AdapterError as error:
                raise ApiError(422, f"adapter {name!r} was not loaded: {error}", "lora_path") from None
            await _add(backend, name, source, body.lora_path, sources, "lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post(
        "/v1/unload_lora_adapter",
        response_class=Response,  # errors documented as JSON; the success is text (PLAIN_TEXT_OK)
        responses=PLAIN_TEXT_OK | ERROR_RESPONSES[400, 401, 403, 404, 413, 503],
    )
    async def unload_lora_adapter(body: UnloadLoraAdapter, request: Request):
        """Unloads an adapter: gone for new requests at once; answers once its requests in flight have
        finished, or the backend stopped waiting for them (DELETE /v1/adapters's 202)."""
        access.authorize(request, None)
        name = body.lora_name
        async with locks.hold(name):
            try:
                await backend.remove_adapter(name)
            except ApiError as error:
                if error.status != 404:
                    raise
                raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/tokenize", responses=ERROR_RESPONSES[400, 401, 404, 413, 503])
    async def tokenize(body: TokenizeRequest, request: Request):
        """{count, max_model_len, tokens, token_strs}: a prompt longer than the context is counted, not refused."""
        await _check_model(backend, access, request, body.model)
        tokenizer, context = await _tokenizer(backend)
        tokens = await asyncio.to_thread(body.ids, tokenizer, backend.base_name)  # long texts: off the event loop
        strings = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return {"count": len(tokens), "max_model_len": context, "tokens": tokens, "token_strs": strings}

    @app.post("/detokenize", responses=ERROR_RESPONSES[400, 401, 404, 413, 503])
    async def detokenize(body: DetokenizeRequest, request: Request):
        """{prompt}: the text of `tokens`, special tokens included, as vLLM decodes them."""
        await _check_model(backend, access, request, body.model)
        tokenizer, _ = await _tokenizer(backend)
        vocabulary = len(tokenizer)
        for i, token in enumerate(body.tokens):
            if not 0 <= token < vocabulary:
                raise ApiError(
                    400, f"tokens[{i}] = {token} is outside the vocabulary (ids 0 to {vocabulary - 1})", "tokens"
                )
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}

    @app.get("/tokenizer_info", responses=ERROR_RESPONSES[401, 503])
    async def get_tokenizer_info(request: Request):
        """The tokenizer's configuration (vLLM's --enable-tokenizer-info-endpoint, always on here; any key)."""
        access.known_key(request)
        tokenizer, _ = await _tokenizer(backend)
        return tokenizer_info(tokenizer)
