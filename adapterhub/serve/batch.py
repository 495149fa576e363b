"""The rows being generated together: one KV cache for all of them, rows joining and leaving at
any decode step (iteration-level batching, as Orca and vLLM do it).

Every row is left-padded to the running length L:

    cache, per layer:  keys, values (B, heads, L, head_dim)
    mask:              (B, L)   1 where the row has a real token, 0 on its padding
    row i's next position: mask[i].sum()   (positions count real tokens only)

Rows that join are prefilled together in one forward (left-padded among themselves, each with its
own adapter), then the shorter of the two caches is padded on the left and both are stacked on the
batch axis. Rows that leave are dropped, and the padding columns no remaining row needs are cut.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def prefill(model: nn.Module, prompts: list[list[int]], pad_id: int) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """Runs the prompts as one left-padded batch (routing is the caller's `Backbone.use`);
    returns (cache, mask (b, P), last-position logits (b, vocab) in fp32)."""
    device = next(model.parameters()).device
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, P)
    cache = DynamicCache()
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    )
    _check_cache(out.cache)
    return out.cache, mask, out.logits[:, -1].float()


def _check_cache(cache: DynamicCache) -> None:
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])}) or [type(cache).__name__]
        raise TypeError(
            f"the server batches models whose KV cache is transformers' DynamicCache of full-attention "
            f"layers; this model's cache has {kinds} (sliding-window or recurrent layers)"
        )


class RunningBatch:
    """The KV cache and attention mask of the rows in flight, in row order."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L)

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.size(0)

    def lengths(self) -> torch.Tensor:
        """(B,) tokens each row holds: its next position."""
        return self.mask.sum(-1)

    def decode(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row (B,); returns the next-token logits (B, vocab) in fp32."""
        positions = self.lengths()[:, None]  # (B, 1)
        self.mask = torch.cat((self.mask, self.mask.new_ones(self.rows, 1)), 1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        )
        self.cache = out.cache
        return out.logits[:, -1].float()

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Appends prefilled rows (cache with mask (b, P)) after the running ones."""
        if self.mask is None:
            self.cache, self.mask = cache, mask
            return
        L = max(self.mask.size(1), mask.size(1))
        layers = [
            (
                torch.cat((_pad_left(a.keys, L), _pad_left(b.keys, L))),
                torch.cat((_pad_left(a.values, L), _pad_left(b.values, L))),
            )
            for a, b in zip(self.cache.layers, cache.layers)
        ]
        self.cache = DynamicCache(layers)
        self.mask = torch.cat((_pad_left(self.mask, L, dim=1), _pad_left(mask, L, dim=1)))

    def keep(self, rows: list[int]) -> None:
        """Keeps only `rows` (in that order, repeats allowed), and cuts padding no kept row needs."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        first = int((mask.sum(0) > 0).long().argmax())  # the first column some kept row uses
        self.mask = mask[:, first:]
        self.cache = DynamicCache(
            [(layer.keys[index, :, first:], layer.values[index, :, first:]) for layer in self.cache.layers]
        )


def _pad_left(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    """`t` with zeros put in front along `dim` up to `length`."""
    missing = length - t.size(dim)
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat((t.new_zeros(shape), t), dim)
