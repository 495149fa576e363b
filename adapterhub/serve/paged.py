"""The paged KV cache and the attention of one packed step.

A step is one forward of a flat sequence (1, T): prefill chunks and decode tokens of many rows one
after another, each row with its own positions. The model runs as it is (transformers' layers,
rotary, our adapter hooks); only its attention function is ours, registered with transformers'
`AttentionInterface` as "adapterhub_paged". Outside a step it is plain SDPA (so the model keeps
working offline); inside one, for each layer it

1. writes the step's new K/V into the pool at each token's slot (block * block_size + offset), in place;
2. attends: decode rows together (one SDPA over their gathered K/V, padded to the longest row,
   masked), and each prefill chunk on its own (causal from its row's first cached position).

Rows never move: joining, leaving and sharing prefixes only change block tables.

    pool (per layer):  keys, values  (blocks * block_size, kv_heads, head_dim)   model dtype
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "adapterhub_paged"
_active = threading.local()  # .step: the Step of the forward running on this thread


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder's attention, from its config."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class KVPool:
    """Keys and values of every layer, `blocks` blocks of `block_size` tokens, preallocated."""

    def __init__(self, model: nn.Module, blocks: int, block_size: int):
        layers, kv_heads, head_dim = kv_shape(model)
        weight = next(model.parameters())
        shape = (blocks * block_size, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(layers)]
        self.blocks, self.block_size = blocks, block_size

    @staticmethod
    def bytes_per_token(model: nn.Module) -> int:
        layers, kv_heads, head_dim = kv_shape(model)
        return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()

    def copy_block(self, source: int, target: int) -> None:
        """Copies one block's K/V in every layer (a forked choice's own copy of a partial block)."""
        s, t, n = source * self.block_size, target * self.block_size, self.block_size
        for tensors in (self.keys, self.values):
            for layer in tensors:
                layer[t : t + n].copy_(layer[s : s + n])


@dataclass
class Chunk:
    """One row's tokens in a step: `count` tokens from position `start` (tokens before it are cached)."""

    blocks: list[int]  # the row's block table (covers start + count tokens)
    start: int
    count: int


class Step:
    """The index tensors of one packed step, made once and used by every layer."""

    def __init__(self, pool: KVPool, chunks: list[Chunk], device: torch.device):
        self.pool, bs = pool, pool.block_size
        width = max(len(chunk.blocks) for chunk in chunks)
        table = torch.tensor([c.blocks + [0] * (width - len(c.blocks)) for c in chunks], device=device)  # (C, width)
        slots = (table[:, :, None] * bs + torch.arange(bs, device=device)).view(len(chunks), -1)  # (C, width * bs)
        starts = torch.tensor([c.start for c in chunks], device=device)  # (C,)
        counts = torch.tensor([c.count for c in chunks], device=device)
        offsets = counts.cumsum(0) - counts  # (C,) each chunk's first place in the step
        chunk = torch.repeat_interleave(torch.arange(len(chunks), device=device), counts)  # (T,)
        self.positions = starts[chunk] + torch.arange(chunk.numel(), device=device) - offsets[chunk]  # (T,)
        self.tokens = chunk.numel()
        self.write = slots[chunk, self.positions]  # (T,) each token's slot
        decoding = (counts == 1).nonzero().flatten()  # (D,) chunks of one token: attended together
        self.decode = offsets[decoding]  # (D,) their place in the step
        lengths = starts[decoding] + 1  # (D,) tokens each attends to
        longest = int(lengths.max()) if decoding.numel() else 0
        self.decode_read = slots[decoding, :longest].flatten()  # (D * Lmax,); past a row's length: masked
        self.decode_mask = (torch.arange(longest, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        self.decode_shape = (decoding.numel(), longest, *pool.keys[0].shape[1:]) if pool.keys else ()
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # reused by every layer
        self.prefill = []  # (place in the step, tokens, their slots to read (c,), causal mask (n, c))
        for c in (counts > 1).nonzero().flatten().tolist():
            start, count, end = chunks[c].start, chunks[c].count, chunks[c].start + chunks[c].count
            keys = torch.arange(end, device=device)
            queries = torch.arange(start, end, device=device)
            self.prefill.append((int(offsets[c]), count, slots[c, :end], keys[None, :] <= queries[:, None]))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Makes the model's attention (on this thread) this step's, for one forward."""
        _active.step = self
        try:
            yield
        finally:
            _active.step = None

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None):
        """query (1, H, T, d), key/value (1, KV, T, d) of the step's tokens -> (1, T, H, d)."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        keys.index_copy_(0, self.write, key[0].transpose(0, 1))
        values.index_copy_(0, self.write, value[0].transpose(0, 1))
        q = query[0].transpose(0, 1)  # (T, H, d)
        out = torch.empty_like(q)
        gqa = query.size(1) != key.size(1)
        if self.decode.numel():
            if self._gathered is None:
                self._gathered = (keys.new_empty(self.decode_shape), values.new_empty(self.decode_shape))
            k, v = self._gathered  # (D, Lmax, KV, d): index_select into one buffer is ~3x faster than k[index]
            torch.index_select(keys, 0, self.decode_read, out=k.view(-1, *k.shape[2:]))
            torch.index_select(values, 0, self.decode_read, out=v.view(-1, *v.shape[2:]))
            k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # (D, KV, Lmax, d)
            o = F.scaled_dot_product_attention(
                q[self.decode].unsqueeze(2), k, v, attn_mask=self.decode_mask, scale=scaling, enable_gqa=gqa
            )  # (D, H, 1, d)
            out[self.decode] = o[:, :, 0]
        for offset, count, read, mask in self.prefill:
            k = keys.index_select(0, read).transpose(0, 1)[None]  # (1, KV, c, d)
            v = values.index_select(0, read).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(
                query[:, :, offset : offset + count], k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa
            )  # (1, H, n, d)
            out[offset : offset + count] = o[0].transpose(0, 1)
        return out[None], None


UNSUPPORTED = ("softcap", "s_aux", "sinks", "sliding_window")  # attention variants the paged step does not do


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    step = getattr(_active, "step", None)
    if step is not None and any(kwargs.get(k) is not None for k in UNSUPPORTED):
        raise TypeError(
            f"{type(module).__name__} asks for attention with {[k for k in UNSUPPORTED if kwargs.get(k) is not None]}, "
            "which the server's paged attention does not implement"
        )
    if step is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return step.attend(module.layer_idx, query, key, value, scaling)


def _mask(*args, **kwargs):
    return None if getattr(_active, "step", None) is not None else sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, _mask)


def use_paged_attention(model: nn.Module) -> None:
    """Switches `model` to the paged attention (plain SDPA outside a step); a TypeError for models
    whose layers do not all attend to every earlier token (sliding windows, recurrent layers)."""
    config = model.config.get_text_config()
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise TypeError(
            f"the server's paged attention does not soft-cap attention logits, which this {config.model_type} "
            "model does (attn_logit_softcapping)"
        )
    kinds = set(getattr(config, "layer_types", None) or ())
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if kinds - {"full_attention"} or (not kinds and windowed):
        raise TypeError(
            f"the server's paged KV cache serves models whose layers all use full attention; this "
            f"{config.model_type} model has {sorted(kinds - {'full_attention'}) or ['sliding_window']} layers"
        )
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise TypeError(
            f"{type(model).__name__} does not take a pluggable attention function (transformers' "
            "AttentionInterface), which the server's paged KV cache needs"
        )
