"""VeRA's shared random projections, drawn as PEFT draws them (peft/tuners/vera/model.py,
`_init_vera_A_vera_B`), so that a file saved without them (save_projection=False) and a fresh
adapter from `VeraType.init` get PEFT's projections bit for bit:

    g = torch.Generator("cpu").manual_seed(projection_prng_key)
    vera_A (r, max_in)  ~ U(-bound, bound) from g, then
    vera_B (max_out, r) ~ U(-bound, bound) from g,     bound = sqrt(3) * (sqrt(2) / sqrt(fan_in)), fan_in = dim 1

max_in / max_out are the largest in / out features among the adapted modules: which is why
regenerating them needs the model, and cannot happen while reading the files.
"""

from __future__ import annotations

import math

import torch


def make_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vera_A (r, max_in), vera_B (max_out, r)) in fp32, equal to PEFT's for the same key and sizes."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_A = _kaiming_uniform((r, max_in), generator)
    vera_B = _kaiming_uniform((max_out, r), generator)  # drawn second, from the same generator
    return vera_A, vera_B


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`, its float operations in its order (another order rounds the bound differently)."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
