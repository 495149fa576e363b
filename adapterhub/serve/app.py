"""The HTTP face of a backend (backend.py: an Engine here, or Ray Serve replicas): OpenAI's
completions and chat completions (streamed as server-sent events or whole), the model list, adapter
loading and deletion, /metrics and /health.

`model` names the adapter (or the base model), as vLLM and LoRAX do. Errors come in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}: 400 invalid parameters or a prompt too long,
401/403 keys, 404 unknown model, 422 an adapter that cannot be loaded, 503 no slot free now or a
replica failed (retry). Each generation's response names the replica that ran it in the header
`x-adapterhub-replica`.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import AdapterError
from .api import AdapterUpload, ChatRequest, CompletionRequest
from .engine import Finished, Token
from .errors import ApiError, Denied
from .tenancy import Keys, Sources

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    422: "adapter_error",
    500: "server_error",
    503: "server_busy",
}
REPLICA_HEADER = "x-adapterhub-replica"


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": status}}


def create_app(backend, *, keys: Keys | None = None, sources: Sources | None = None) -> FastAPI:
    """The app serving `backend` (a LocalBackend, or ray_app's RayBackend); shuts it down with the app.
    `sources` (default: none allowed) says where POST /v1/adapters may load from."""
    sources = sources or Sources()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        backend.shutdown()

    app = FastAPI(title="adapterhub", lifespan=lifespan)
    metrics = backend.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return JSONResponse(error_body(error.status, str(error), error.param), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return JSONResponse(error_body(400, f"{param or 'body'}: {first['msg']}", param), status_code=400)

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
        return await backend.health()

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        adapters = {a["id"]: a for a in await backend.adapters()}
        created = int(time.time())
        data = [
            {
                "id": n,
                "object": "model",
                "created": created,
                "owned_by": "adapterhub",
                "root": adapters[n]["source"] if n in adapters else n,
                "parent": backend.base_name if n in adapters else None,
            }
            for n in visible(request, [backend.base_name, *sorted(adapters)])
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        authorize(request, None)
        return {"object": "list", "data": await backend.adapters()}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(upload: AdapterUpload, request: Request):
        authorize(request, None)
        if upload.name == backend.base_name:
            raise ApiError(422, f"{upload.name!r} is the base model's name; choose another", "name")
        try:
            source = sources.resolve(upload.source)
        except AdapterError as error:
            raise ApiError(422, f"adapter {upload.name!r} was not loaded: {error}", "source") from None
        return await backend.add_adapter(upload.name, source, upload.revision)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request):
        """200 once the adapter's requests in flight have finished; 202 if some still run when the
        backend stops waiting (the name is gone for new requests either way; its slot frees when they end)."""
        authorize(request, None)
        in_flight = await backend.remove_adapter(name)
        return JSONResponse(
            {"id": name, "object": "adapter", "deleted": True, "in_flight": in_flight},
            status_code=202 if in_flight else 200,
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        authorize(request, body.model)
        return await _respond(backend, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        authorize(request, body.model)
        return await _respond(backend, body, chat=True)

    return app


async def _respond(backend, body: CompletionRequest | ChatRequest, *, chat: bool):
    events = backend.generate(None if body.model == backend.base_name else body.model, body)
    start = await anext(events)  # errors before the first token (unknown model, too long) are plain JSON errors
    headers = {REPLICA_HEADER: start.replica}
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": body.model,
    }
    usage = _Usage(start.prompt_tokens)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(events, head, usage, chat, include_usage, body.n), headers=headers, media_type="text/event-stream"
        )
    texts, reasons = {}, {}
    async for index, event in events:
        if isinstance(event, Token):
            texts[index] = texts.get(index, "") + event.text
        elif isinstance(event, Finished):
            reasons[index] = event.reason
            usage.completion += event.tokens
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts.get(i, "")},
            "logprobs": None,
            "finish_reason": reasons[i],
        }
        if chat
        else {"index": i, "text": texts.get(i, ""), "logprobs": None, "finish_reason": reasons[i]}
        for i in sorted(reasons)
    ]
    return JSONResponse(
        {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage.json()},
        headers=headers,
    )


class _Usage:
    def __init__(self, prompt: int):
        self.prompt, self.completion = prompt, 0

    def json(self) -> dict:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }


async def _sse(events, head: dict, usage: _Usage, chat: bool, include_usage: bool, n: int):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, **extra) -> str:
        return f"data: {json.dumps({**head, 'object': obj, 'choices': choices, **extra})}\n\n"

    try:
        if chat:
            yield chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(n)
                ]
            )
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
        yield f"data: {json.dumps(error_body(error.status, str(error)))}\n\n"
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"
