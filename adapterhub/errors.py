"""The one error type for a bad adapter or adapter source."""


class AdapterError(ValueError):
    """An adapter (or the place it comes from) cannot be used as given.

    The message names the file, key or tensor that is wrong, what was expected and what was
    found, and how to fix it. A ValueError, so callers that already catch bad values keep working.
    """


class NoFreeSlot(AdapterError):
    """Every slot holds a pinned adapter or one that batches in flight read: nothing can be evicted now.
    Nothing is wrong with the adapter; the load can be tried again once a slot is let go."""
