"""The HTTP face of a backend (backend.py: an Engine here, or Ray Serve replicas): OpenAI's
completions and chat completions (streamed as server-sent events or whole), the model list, adapter
loading and deletion, /metrics and /health.

`model` names the adapter (or the base model), as vLLM and LoRAX do. Every error, the framework's
too, comes in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 invalid parameters
or a prompt too long, 401/403 keys, 404 unknown model or route, 422 an adapter that cannot be loaded,
429 no room in the queue now (Retry-After says when to retry), 503 no slot free or a replica failed
(retry), 504 past --request-timeout. Each generation's response names the replica that ran it in the
header `x-adapterhub-replica`.

Tenancy: with keys, a key sees and names only its own models (errors never list the others), the
listings never show server paths, and /metrics (an admin key, or a separate --metrics-port),
/openapi.json and /docs (any key) are behind keys too. A non-streamed request whose client
disconnects is cancelled as a streamed one is.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..errors import AdapterError
from . import compositions, embeddings, vllm_api
from .access import Access
from .api import AdapterUpload, ChatRequest, CompletionRequest
from .errors import ApiError, Denied
from .openapi import ERROR_RESPONSES, error_body, openapi_document
from .responses import respond
from .tenancy import Keys, Sources

MAX_BODY = 8 * 2**20  # bytes: 256 prompts of a few thousand tokens each fit
log = logging.getLogger("adapterhub.serve")


def error_response(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> Response:
    """An error in OpenAI's shape; ASCII JSON, so that any text (a lone surrogate a client sent) encodes."""
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    content = json.dumps(error_body(status, message, param)).encode()
    return Response(content, status_code=status, headers=headers, media_type="application/json")


class _Guard:
    """ASGI middleware, in front of every route: refuses an unknown key (401) and a body over
    `max_body` bytes (413) before anything is parsed, counts each answer by endpoint and status, and
    answers an exception that escapes a route with an OpenAI-shaped 500 instead of a dropped
    connection. Pure ASGI (not `@app.middleware`), so that a route still sees its client disconnect."""

    def __init__(self, app, metrics, keys: Keys | None, max_body: int):
        self.app, self.metrics, self.keys, self.max_body = app, metrics, keys, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal, receive = await self._admit(scope, receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            self.metrics.requests.labels(endpoint="refused", status=str(refusal.status_code)).inc()
            return
        status = None

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:
            if status is not None:  # the response has started: nothing more can be said
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            response = error_response(500, f"the server failed on this request ({type(error).__name__}); retry")
            await response(scope, receive, sending)
        finally:
            route = scope.get("route")  # its path template: one label per endpoint
            label = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(endpoint=label, status=str(status or 500)).inc()

    async def _admit(self, scope, receive):
        """(an error response or None, the receive to hand on): the key checked, the body read whole
        up to max_body bytes and replayed to the route."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.keys is not None and scope["path"] != "/health":
            try:
                self.keys.names_for(headers.get("authorization"))
            except Denied as denied:
                return error_response(denied.status, str(denied)), receive
        too_big = error_response(413, f"the body is larger than the server's limit of {self.max_body} bytes")
        if int(headers.get("content-length") or 0) > self.max_body:
            return too_big, receive
        body, more = b"", scope["method"] in ("POST", "PUT", "PATCH", "DELETE")
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None, _replay([message], receive)  # gone already: the route sees the disconnect
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return too_big, receive
        return None, _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def _replay(messages: list[dict], receive):
    """A receive that gives `messages` first, then the client's own (its disconnect)."""

    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


def _field_part(part: str | int) -> bool:
    """Whether a validation error's location part names a field or an index (not a union member's
    tag such as "list[int]" or "function-after[...]")."""
    return isinstance(part, int) or (part.isidentifier() and part not in {"str", "int", "float", "bool", "list"})


def create_app(
    backend,
    *,
    keys: Keys | None = None,
    sources: Sources | None = None,
    metrics_route: bool = True,
    max_body: int = MAX_BODY,
) -> FastAPI:
    """The app serving `backend` (a LocalBackend, or ray_app's RayBackend); shuts it down with the app.
    `sources` (default: none allowed) says where POST /v1/adapters may load from; `metrics_route`:
    serve /metrics here (False when a separate --metrics-port serves it); `max_body`: the largest
    request body in bytes (413 past it)."""
    sources = sources or Sources()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        backend.shutdown()

    app = FastAPI(title="adapterhub", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = backend.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error_response(error.status, str(error), error.param, error.retry_after)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException):  # unknown route, wrong method
        response = error_response(error.status_code, f"{request.method} {request.url.path}: {error.detail}")
        response.headers.update(error.headers or {})
        if error.status_code == 405:  # every method of the path (Starlette names only its first route's)
            paths = [r for r in app.routes if getattr(r, "path_regex", None) and r.path_regex.match(request.url.path)]
            response.headers["Allow"] = ", ".join(sorted({m for r in paths for m in r.methods or ()}))
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "not JSON")
            return error_response(400, f"the body is not valid JSON: {reason} (character {first['loc'][-1]})")
        param = ".".join(str(p) for p in first["loc"][1:] if _field_part(p)) or None
        return error_response(400, f"{param or 'body'}: {first['msg']}", param)

    app.add_middleware(_Guard, metrics=metrics, keys=keys, max_body=max_body)

    access = Access(keys)
    authorize, known_key, tenant, visible = access.authorize, access.known_key, access.tenant, access.visible

    @app.get("/health")
    async def health():
        return await backend.health()

    if metrics_route:

        @app.get(
            "/metrics",
            response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}}
            | ERROR_RESPONSES[401, 403],
        )
        async def prometheus(request: Request):
            authorize(request, None)  # adapter names of every tenant: the admin's
            return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        known_key(request)
        return JSONResponse(openapi_document(app))

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        known_key(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="adapterhub")

    @app.get("/v1/models", responses=ERROR_RESPONSES[401,])
    async def models(request: Request):
        adapters = {a["id"]: a for a in await backend.adapters()}
        loaded = set(adapters)
        for name, composition in (await backend.compositions()).items():  # listed if every input may be used
            usable = set(composition.names) <= loaded
            if usable and len(visible(request, [name, *composition.names])) == len(composition.names) + 1:
                adapters[name] = {"source": "composition"}
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

    @app.get("/v1/adapters", responses=ERROR_RESPONSES[401, 403])
    async def list_adapters(request: Request):
        authorize(request, None)
        return {"object": "list", "data": await backend.adapters()}

    @app.post("/v1/adapters", status_code=201, responses=ERROR_RESPONSES[400, 401, 403, 413, 422, 503])
    async def add_adapter(upload: AdapterUpload, request: Request):
        authorize(request, None)
        if upload.name == backend.base_name:
            raise ApiError(422, f"{upload.name!r} is the base model's name; choose another", "name")
        try:
            source = sources.resolve(upload.source)
        except AdapterError as error:
            raise ApiError(422, f"adapter {upload.name!r} was not loaded: {error}", "source") from None
        return await backend.add_adapter(upload.name, source, upload.revision, upload.source, sources.root_of(source))

    @app.delete(
        "/v1/adapters/{name}",
        responses={202: {"description": "deleted; some requests still run"}} | ERROR_RESPONSES[401, 403, 404],
    )
    async def delete_adapter(name: str, request: Request):
        """200 once the adapter's requests in flight have finished; 202 if some still run when the
        backend stops waiting (the name is gone for new requests either way; its slot frees when they end)."""
        authorize(request, None)
        in_flight = await backend.remove_adapter(name)
        return JSONResponse(
            {"id": name, "object": "adapter", "deleted": True, "in_flight": in_flight},
            status_code=202 if in_flight else 200,
        )

    generation_errors = {
        200: {
            "description": "the whole response (JSON), or with stream=true its chunks as server-sent events",
            "content": {"application/json": {}, "text/event-stream": {}},
        }
    } | ERROR_RESPONSES[400, 401, 403, 404, 413, 422, 429, 500, 503, 504]  # 422: LoRAX's adapter_id not loadable

    async def lorax(body, request: Request):
        """The body with `model` the adapter LoRAX's `adapter_id` names (loaded just in time from
        `adapter_source` when it is not loaded yet), or the body as it came."""
        if body.adapter_id is None:
            return body
        model = await vllm_api.lorax_model(backend, access, sources, request, body.adapter_id, body.adapter_source)
        return body.model_copy(update={"model": model})

    @app.post("/v1/completions", responses=generation_errors)
    async def completions(body: CompletionRequest, request: Request):
        body = await lorax(body, request)
        composition = compositions.requested(body, backend.base_name)
        await compositions.authorize(access, request, backend, body.model, composition)
        return await respond(backend, body, request, tenant(request), chat=False, composition=composition)

    @app.post("/v1/chat/completions", responses=generation_errors)
    async def chat(body: ChatRequest, request: Request):
        body = await lorax(body, request)
        composition = compositions.requested(body, backend.base_name)
        await compositions.authorize(access, request, backend, body.model, composition)
        return await respond(backend, body, request, tenant(request), chat=True, composition=composition)

    vllm_api.add_routes(app, backend, access, sources)
    embeddings.add_routes(app, backend, access, sources)
    compositions.add_routes(app, backend, access)
    return app
