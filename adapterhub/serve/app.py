"""The HTTP face of the engine: OpenAI's completions and chat completions (streamed as server-sent
events or whole), the model list, adapter loading and deletion, /metrics and /health.

`model` names the adapter (or the base model), as vLLM and LoRAX do. Errors come in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}: 400 invalid parameters or a prompt too long,
401/403 keys, 404 unknown model, 422 an adapter that cannot be loaded, 503 no slot free now.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import AdapterError, NoFreeSlot
from .api import AdapterUpload, ChatRequest, CompletionRequest
from .engine import Engine, Failed, Finished, RequestError, Token, UnknownAdapter
from .sampling import Sampling
from .tenancy import Denied, Keys, Sources

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 422: "adapter_error", 500: "server_error", 503: "server_busy"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def create_app(engine: Engine, *, keys: Keys | None = None, sources: Sources = Sources(),
               delete_timeout: float = 600.0) -> FastAPI:
    """The app serving `engine` (started and stopped with the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.stop()

    app = FastAPI(title="adapterhub", lifespan=lifespan)
    metrics = engine.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error_response(error.status, str(error), error.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return error_response(400, f"{param or 'body'}: {first['msg']}", param)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")  # its path template: one label per endpoint
        metrics.requests.labels(endpoint=getattr(route, "path", "unmatched"), status=str(response.status_code)).inc()
        return response

    def authorize(request: Request, model: str | None) -> None:
        if keys is not None:
            try:
                keys.check(request.headers.get("authorization"), model)
            except Denied as denied:
                raise ApiError(denied.status, str(denied)) from None

    def visible(request: Request, names: list[str]) -> list[str]:
        if keys is None:
            return names
        try:
            return keys.visible(request.headers.get("authorization"), names)
        except Denied as denied:
            raise ApiError(denied.status, str(denied)) from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "running_rows": engine.running_rows(), "queue_depth": engine.queue_depth()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        names = visible(request, [engine.base_name, *sorted(engine.adapters())])
        created = int(time.time())
        data = [{"id": n, "object": "model", "created": created, "owned_by": "adapterhub",
                 "root": engine.base_name if n == engine.base_name else engine.source_of(n),
                 "parent": None if n == engine.base_name else engine.base_name} for n in names]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        authorize(request, None)
        return {"object": "list", "data": [_adapter_json(name, info, engine.source_of(name))
                                           for name, info in sorted(engine.adapters().items())]}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(upload: AdapterUpload, request: Request):
        authorize(request, None)
        try:
            source = sources.resolve(upload.source)
            info = await run_in_threadpool(engine.add_adapter, upload.name, source, upload.revision)
        except NoFreeSlot as error:
            raise ApiError(503, str(error)) from None
        except (AdapterError, OSError) as error:
            raise ApiError(422, f"adapter {upload.name!r} was not loaded: {error}", "source") from None
        return _adapter_json(upload.name, info, source)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request):
        authorize(request, None)
        try:
            await run_in_threadpool(engine.remove_adapter, name, delete_timeout)
        except UnknownAdapter as error:
            raise ApiError(404, str(error), "name") from None
        return {"id": name, "object": "adapter", "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        authorize(request, body.model)
        prompts = [engine.tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in _prompts(body)]
        return await _respond(engine, body, prompts, body.max_tokens or 16, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        authorize(request, body.model)
        if not getattr(engine.tokenizer, "chat_template", None):
            raise ApiError(400, f"{engine.base_name}'s tokenizer has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        return await _respond(engine, body, [prompt], body.limit() or max(engine.context - len(prompt), 1), chat=True)

    return app


def _prompts(body: CompletionRequest) -> list:
    try:
        return body.prompts()
    except ValueError as error:
        raise ApiError(400, str(error), "prompt") from None


def _adapter_json(name: str, info, source: str) -> dict:
    resident = info is not None
    return {"id": name, "object": "adapter", "source": source, "resident": resident,
            **({"type": info.type, "rank": info.rank, "slot": info.slot, "bytes": info.nbytes} if resident else {})}


async def _respond(engine: Engine, body, prompts: list[list[int]], max_tokens: int, *, chat: bool):
    sampling = body.sampling(max_tokens)
    adapter = None if body.model == engine.base_name else body.model
    events = _submit(engine, adapter, prompts, sampling)
    await anext(events)  # submission errors (unknown model, too long) become plain JSON errors
    kind = "chatcmpl" if chat else "cmpl"
    head = {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    usage = _Usage(sum(len(p) for p in prompts))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(events, head, usage, chat, include_usage, sampling.n),
                                 media_type="text/event-stream")
    texts, reasons = {}, {}
    async for index, event in events:
        if isinstance(event, Token):
            texts[index] = texts.get(index, "") + event.text
        elif isinstance(event, Finished):
            reasons[index] = event.reason
            usage.completion += event.tokens
    choices = [{"index": i, "message": {"role": "assistant", "content": texts.get(i, "")}, "logprobs": None,
                "finish_reason": reasons[i]} if chat else
               {"index": i, "text": texts.get(i, ""), "logprobs": None, "finish_reason": reasons[i]}
               for i in sorted(reasons)]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": usage.json()}


class _Usage:
    def __init__(self, prompt: int):
        self.prompt, self.completion = prompt, 0

    def json(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}


async def _submit(engine: Engine, adapter: str | None, prompts: list[list[int]],
                  sampling: Sampling) -> AsyncIterator[tuple[int, object] | None]:
    """Submits one engine request per prompt; yields None once they are queued, then (choice index,
    event) until every choice finished. Raises ApiError for a failed submission or generation; the
    requests are cancelled if the consumer goes away."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    requests = []
    try:
        for k, prompt in enumerate(prompts):
            def deliver(event, offset=k * sampling.n):
                loop.call_soon_threadsafe(queue.put_nowait, (offset, event))
            try:
                requests.append(engine.submit(adapter, prompt, sampling, deliver))
            except UnknownAdapter as error:
                raise ApiError(404, str(error), "model") from None
            except RequestError as error:
                raise ApiError(400, str(error), "prompt") from None
        yield None
        unfinished = len(prompts) * sampling.n
        while unfinished:
            offset, event = await queue.get()
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message)
            if isinstance(event, Finished):
                unfinished -= 1
            yield offset + event.choice, event
    finally:
        for request in requests:
            request.cancel()


async def _sse(events, head: dict, usage: _Usage, chat: bool, include_usage: bool, n: int):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, **extra) -> str:
        return f"data: {json.dumps({**head, 'object': obj, 'choices': choices, **extra})}\n\n"

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(n)])
        async for index, event in events:
            if isinstance(event, Token) and event.text:
                delta = {"delta": {"content": event.text}} if chat else {"text": event.text}
                yield chunk([{"index": index, **delta, "logprobs": None, "finish_reason": None}])
            elif isinstance(event, Finished):
                usage.completion += event.tokens
                delta = {"delta": {}} if chat else {"text": ""}
                yield chunk([{"index": index, **delta, "logprobs": None, "finish_reason": event.reason}])
        if include_usage:
            yield chunk([], usage=usage.json())
    except ApiError as error:  # the stream has started: the error is its last event
        yield f"data: {json.dumps({'error': {'message': str(error), 'type': ERROR_TYPES.get(error.status), 'code': error.status}})}\n\n"
    yield "data: [DONE]\n\n"
