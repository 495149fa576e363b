"""Directories written whole or not at all, and the training state that makes a run resumable."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A temporary directory next to `path` to write into; renamed to `path` (replacing it) when the
    block ends normally, removed if it raises: readers see the old directory or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_state(directory: Path, state: dict) -> None:
    with atomic_directory(directory) as tmp:
        torch.save(state, tmp / STATE_FILE)


def load_state(directory: Path) -> dict | None:
    """The saved training state, or None if `directory` holds none."""
    file = directory / STATE_FILE
    return torch.load(file, weights_only=False) if file.is_file() else None
