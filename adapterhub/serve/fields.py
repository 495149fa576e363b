"""Field types shared by the request bodies (api.py, compositions.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _unicode(text: str) -> str:
    """Refuses text that cannot be encoded (a lone surrogate, which JSON's \\ud800 escapes allow)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"holds a lone surrogate at character {error.start}; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
