"""Merging task tensors as PEFT's `add_weighted_adapter` does (peft.utils.merge_utils), for the types
that materialize compositions (`AdapterType.compose`).

    linear            sum_k w_k t_k
    ties              magnitude-prune each t_k to `density`, keep the majority sign, mean of the kept
    dare_linear       randomly drop (1 - density) of each t_k, rescale by 1/density, then linear
    dare_ties         the same drop, then ties' sign election
    magnitude_prune   magnitude-prune each t_k to `density`, then linear

The operations, their order and their dtypes follow PEFT's, so that results agree to fp32 rounding.
DARE draws its masks from a generator seeded by the composition (PEFT draws from the global RNG), so
that one composition always materializes to the same weights.
"""

from __future__ import annotations

import torch

TASK_ARITHMETIC = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})


def merge(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    method: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """tensors: K tensors of one shape; weights (K,) -> the merged tensor of that shape."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_prune_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (K, ...)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        sign = stacked.sign()
        magnitude = stacked.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
        keep = sign == torch.where(magnitude >= 0, 1, -1)  # (K, ...) the majority sign's entries
        return (weighted * keep).sum(dim=0) / torch.clamp(keep.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


def _prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """The `density` fraction of entries largest in magnitude kept, the rest zeroed."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each entry kept with probability `density` and rescaled by 1/density (DARE)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density
