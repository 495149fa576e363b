"""The API's error shape (OpenAI's) and its OpenAPI document: every error status each route can
answer is documented with that shape, and FastAPI's own 422 (the server answers 400) is left out."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "adapter_error",
    429: "rate_limit_exceeded",
    499: "client_closed_request",
    500: "server_error",
    503: "server_busy",
    504: "timeout",
}
DESCRIPTIONS = {
    400: "invalid parameters, a body that is not JSON, or a prompt too long for the context",
    401: "a missing or unknown API key",
    403: "the key may not use this model or endpoint",
    404: "no such model or adapter",
    413: "the body is larger than the server's limit (--max-body-bytes)",
    422: "the adapter could not be loaded (the message names the file and the fix)",
    429: "no room in the queue now; retry after the Retry-After header's seconds",
    500: "the engine failed on this request (others are unaffected)",
    503: "no adapter slot could be freed in time, a replica failed, or the server is shutting down: retry",
    504: "the request did not finish within --request-timeout",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorBody(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": status}}


class _Responses:
    """ERROR_RESPONSES[400, 404]: FastAPI `responses=` documenting those statuses with ErrorBody."""

    def __getitem__(self, statuses: tuple[int, ...]) -> dict:
        responses = {}
        for status in statuses:
            entry: dict = {"model": ErrorBody, "description": DESCRIPTIONS[status]}
            if status in (429, 503):
                entry["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
            responses[status] = entry
        return responses


ERROR_RESPONSES = _Responses()


def openapi_document(app: FastAPI) -> dict:
    """app's OpenAPI document without FastAPI's 422 validation responses (the server answers 400)."""
    if app.openapi_schema is None:
        document = app.openapi()
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if "HTTPValidationError" in str(responses.get("422")):  # FastAPI's, not the adapter error
                    del responses["422"]
        schemas = document.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
    return app.openapi_schema
