"""Merging task tensors as PEFT's `add_weighted_adapter` does (peft.utils.merge_utils), for the types
that materialize compositions (`AdapterType.compose`).

    linear            sum_k w_k t_k
    ties              magnitude-prune each t_k to `density`, keep the majority sign, mean of the kept
    dare_linear       randomly drop (1 - density) of each t_k, rescale by 1/density, then linear
    dare_ties         the same drop, then ties' sign election
    magnitude_prune   magnitude-prune each t_k to `density`, then linear

The same operations in the same dtypes as PEFT's, but batched: `tensors` stacks K inputs of M tensors
of one shape, (K, M, ...), so that a whole model's modules of one shape merge in a few large ops (a
TIES merge of two SmolLM2 adapters in tens of milliseconds instead of PEFT's per-tensor loop).
Magnitude pruning finds each tensor's k-th largest magnitude with `kthvalue` (linear time) and keeps
what is at least that, exactly PEFT's top-k unless magnitudes tie at the threshold, where it uses
PEFT's `topk` itself. DARE draws its masks from a generator seeded by the composition (PEFT draws
from the global RNG), so that one composition always materializes to the same weights.
"""

from __future__ import annotations

import torch

TASK_ARITHMETIC = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def merge(
    tensors: torch.Tensor,
    weights: torch.Tensor,
    method: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """tensors (K, M, ...): M tensors from each of K inputs; weights (K, M) -> merged (M, ...)."""
    if method in ("ties", "magnitude_prune"):
        tensors = _prune_magnitude(tensors, density)
    elif method in ("dare_linear", "dare_ties"):
        tensors = _prune_random(tensors, density, generator)
    weighted = tensors * weights.view(weights.shape + (1,) * (tensors.dim() - 2))
    if method in ("ties", "dare_ties"):
        sign = tensors.sign()
        magnitude = tensors.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
        keep = sign == torch.where(magnitude >= 0, 1, -1)  # (K, M, ...) the majority sign's entries
        return (weighted * keep).sum(dim=0) / torch.clamp(keep.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


def _prune_magnitude(tensors: torch.Tensor, density: float) -> torch.Tensor:
    """Each (k, m) tensor's `density` fraction of entries largest in magnitude kept, the rest zeroed."""
    if density >= 1:
        return tensors
    flat = tensors.reshape(tensors.size(0) * tensors.size(1), -1)  # (K*M, n)
    n = flat.size(1)
    k = int(density * n)
    if k == 0:
        return torch.zeros_like(tensors)
    magnitude = flat.abs()
    threshold = magnitude.kthvalue(n - k + 1, dim=1, keepdim=True).values  # the k-th largest of each
    keep = magnitude >= threshold  # (K*M, n)
    ties = (keep.sum(dim=1) != k) & (threshold.squeeze(1) > 0)  # (ties among zeros change nothing)
    for row in ties.nonzero().flatten().tolist():  # magnitudes tie at the threshold: PEFT's own top-k
        keep[row] = False
        keep[row, torch.topk(magnitude[row], k=k, largest=True).indices] = True
    return flat.masked_fill(~keep, 0).view_as(tensors)


def _prune_random(tensors: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each entry kept with probability `density` and rescaled by 1/density (DARE)."""
    if density >= 1:
        return tensors
    mask = torch.bernoulli(torch.full_like(tensors, density), generator=generator)
    return tensors * mask / density
