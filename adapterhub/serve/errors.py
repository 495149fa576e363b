"""The errors of the server that callers catch: `ApiError` (an HTTP status in OpenAI's error shape),
raised by the app and backends; `UnknownAdapter` and `RequestError`, raised by `Engine.submit` and
`Engine.remove_adapter`; `Denied`, raised by the API keys. A bad adapter is `adapterhub.AdapterError`
(`NoFreeSlot` when no slot can be freed now)."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server answers with an HTTP error status, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param

    def __reduce__(self):  # crosses process boundaries (Ray) whole
        return ApiError, (self.status, str(self), self.param)


class UnknownAdapter(LookupError):
    """A request or call names an adapter the server does not know."""


class RequestError(ValueError):
    """A request the server cannot run as asked (too long for the context, ...)."""


class Denied(Exception):
    """An API key that is missing or unknown (status 401), or may not do what it asks (403)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
