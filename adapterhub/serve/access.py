"""Who may do what, for every route of the app (app.py and the route modules beside it): a key's
tenant, the models it may name and see, and the admin's routes.

A model the key may not use is answered as one that does not exist (404), so that a tenant cannot
learn which models other tenants have.
"""

from __future__ import annotations

import hashlib

from fastapi import Request

from .errors import ApiError, Denied
from .tenancy import Keys


class Access:
    """The key checks of one app; without keys (None) everyone may do everything."""

    def __init__(self, keys: Keys | None):
        self.keys = keys

    def authorize(self, request: Request, model: str | None) -> None:
        """Raises ApiError 401/403 for a denied key, 404 for a `model` the key may not use; `model`
        None: an admin's route (loading, deleting, listing every adapter, metrics)."""
        if self.keys is None:
            return
        try:
            self.keys.check(request.headers.get("authorization"), model)
        except Denied as denied:
            if denied.status == 403 and model is not None:
                raise ApiError(
                    404, f"no model named {model!r}; GET /v1/models lists the models your key may use", "model"
                ) from None
            raise ApiError(denied.status, str(denied)) from None

    def known_key(self, request: Request) -> None:
        """Raises ApiError 401 unless the request carries a known key (any tenant's)."""
        if self.keys is not None:
            try:
                self.keys.names_for(request.headers.get("authorization"))
            except Denied as denied:
                raise ApiError(denied.status, str(denied)) from None

    def tenant(self, request: Request) -> str:
        """The key's fingerprint (admission's fair share is per key); "" without keys."""
        if self.keys is None:
            return ""
        key = (request.headers.get("authorization") or "").split(None, 1)[-1].strip()
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def visible(self, request: Request, names: list[str]) -> list[str]:
        """The `names` the request's key may see."""
        if self.keys is None:
            return names
        try:
            return self.keys.visible(request.headers.get("authorization"), names)
        except Denied as denied:
            raise ApiError(denied.status, str(denied)) from None
