"""The errors of the server that callers catch: `ApiError` (an HTTP status in OpenAI's error shape),
raised by the app and backends; `UnknownAdapter` and `RequestError`, raised by `Engine.submit` and
`Engine.remove_adapter`; `Overloaded`, raised by `Engine.submit` when the queue has no room
(HTTP 429); `Denied`, raised by the API keys. A bad adapter is `adapterhub.AdapterError`
(`NoFreeSlot` when no slot can be freed now)."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server answers with an HTTP error status, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.param, self.retry_after = status, param, retry_after

    def __reduce__(self):  # crosses process boundaries (Ray) whole
        return ApiError, (self.status, str(self), self.param, self.retry_after)


class UnknownAdapter(LookupError):
    """A request or call names an adapter the server does not know."""


class RequestError(ValueError):
    """A request the server cannot run as asked (too long for the context, ...)."""


class Overloaded(Exception):
    """No room for a request now (the queue is full, or its key holds its share: 429; the server is
    shutting down: 503): retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int, status: int = 429):
        super().__init__(message)
        self.retry_after, self.status = retry_after, status

    def __reduce__(self):
        return Overloaded, (str(self), self.retry_after, self.status)


class Denied(Exception):
    """An API key that is missing or unknown (status 401), or may not do what it asks (403)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
