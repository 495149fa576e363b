"""(being written: issue 17)"""

from __future__ import annotations


def add_routes(app, backend, access, sources) -> None:
    """Adds this module's routes to `app`."""
