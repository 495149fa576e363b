"""The paged KV cache and the attention of one packed step.

A step is one forward of a flat sequence (1, T): prefill chunks and decode tokens of many rows one
after another, each row with its own positions. The model runs as it is (transformers' layers,
rotary, our adapter hooks); only its attention function is ours, registered with transformers'
`AttentionInterface` as "adapterhub_paged". Without a step it is plain SDPA (so the model keeps
working offline); in a forward given one (`model(..., **step.inputs())`: transformers hands the
keyword argument `paged` down to every layer's attention) each layer

1. writes the step's new K/V into the pool at each token's slot (block * block_size + offset), in place;
2. attends: decode rows together (one SDPA over their gathered K/V, padded to the longest row,
   masked), and each prefill chunk over its own row's K/V (causal from the chunk's first position).

Rows never move: joining, leaving and sharing prefixes only change block tables. A step holds
tensors only, so a compiled forward (torch.compile, dynamic shapes) runs every step with one graph.

    pool (per layer):  keys, values  ((blocks + 1) * block_size, kv_heads, head_dim)   model dtype
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx.experimental._config
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "adapterhub_paged"
log = logging.getLogger("adapterhub.serve")


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder's attention, from its config."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class KVPool:
    """Keys and values of every layer, `blocks` blocks of `block_size` tokens, preallocated, and one
    more block (`trash`) that padding tokens write to and read from."""

    def __init__(self, model: nn.Module, blocks: int, block_size: int):
        layers, kv_heads, head_dim = kv_shape(model)
        weight = next(model.parameters())
        shape = ((blocks + 1) * block_size, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(layers)]
        self.blocks, self.block_size, self.trash = blocks, block_size, blocks
        for tensor in self.keys + self.values:
            torch._dynamo.mark_static_address(tensor)  # a compiled step writes into them in place

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
    """The index tensors of one packed step, made once and used by every layer; the model gets them
    as keyword arguments (`model(..., **step.inputs())`), which transformers hands to each layer's
    attention function.

    The step's T tokens are the chunks' tokens one after another, then `pad` padding tokens (K/V
    written to the pool's trash block, attending to it only). Decode rows (chunks of one token)
    attend together: one SDPA over their rows' gathered K/V, padded to the longest row and masked.
    Prefill chunks attend each over their own row's K/V, causal: eager (`pad` 0), one SDPA per chunk;
    compiled (`pad` >= 2), one SDPA over the chunks and the padding tokens as a batch padded to the
    longest chunk and row. With `pad` >= 2 every size a compiled step sees is at least 2 (`pad`
    padding rows join the decode group), so torch.compile's dynamic shapes trace one graph instead of
    one per size that happens to be 0 or 1.

        write (T,) each token's slot      positions (T,)
        decode: places (D,), read (D * L,), mask (D, 1, 1, L)
        prefill, eager: per chunk (first place, tokens n, read (end,), mask (n, end))
        prefill, compiled: places (C, Q), read (C, K), mask (C, 1, Q, K)
    """

    def __init__(self, pool: KVPool, chunks: list[Chunk], device: torch.device, pad: int = 0):
        self.pool, bs = pool, pool.block_size
        arange = functools.partial(torch.arange, device=device)
        width = max(len(chunk.blocks) for chunk in chunks)
        table = torch.tensor([c.blocks + [pool.trash] * (width - len(c.blocks)) for c in chunks], device=device)
        slots = (table[:, :, None] * bs + arange(bs)).view(len(chunks), -1)  # (C, width * bs)
        starts = torch.tensor([c.start for c in chunks], device=device)  # (C,)
        counts = torch.tensor([c.count for c in chunks], device=device)
        first = list(itertools.accumulate((c.count for c in chunks), initial=0))  # each chunk's first place
        offsets = torch.tensor(first[:-1], device=device)  # (C,)
        chunk = torch.repeat_interleave(arange(len(chunks)), counts)  # (T,)
        real = chunk.numel()
        positions = starts[chunk] + arange(real) - offsets[chunk]
        trash, padding = pool.trash * bs, arange(real, real + pad)  # padding tokens' places
        self.positions = torch.cat([positions, arange(pad)])  # (T,)
        self.write = torch.cat([slots[chunk, positions], torch.full((pad,), trash, device=device)])  # (T,)
        self.tokens = real + pad
        # A prepared 4D attention mask, which transformers hands to the attention function untouched
        # instead of building a causal mask over the packed sequence; attend() uses its own masks.
        self._prepared_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)

        single = (counts == 1).nonzero().flatten()  # chunks of one token
        places = torch.cat([offsets[single], padding[:1].repeat(pad)])  # (D,) padding rows: the first pad token
        lengths = torch.cat([starts[single] + 1, torch.ones(pad, dtype=torch.long, device=device)])  # (D,)
        self.decode = None
        if places.numel():
            longest = max([c.start + 1 for c in chunks if c.count == 1] + [pad])
            read = torch.cat([slots[single, :longest], torch.full((pad, longest), trash, device=device)])
            mask = arange(longest)[None, :] < lengths[:, None]  # (D, L)
            self.decode = (places, read.flatten(), mask[:, None, None, :])
            self._gather_shape = (places.numel(), longest, *pool.keys[0].shape[1:]) if pool.keys else ()
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # eager: one buffer every layer reuses

        multi = [(first[i], slots[i], c) for i, c in enumerate(chunks) if c.count > 1]  # prefill chunks
        self.prefill, self.prefill_batch = [], None
        if pad:  # compiled: the chunks (and the padding tokens) as one padded batch, one SDPA
            self.prefill_batch = _padded_prefill(multi, (padding, trash), device)
        else:  # eager: one SDPA per chunk, each over its own row's K/V only
            for at, row_slots, c in multi:
                end = c.start + c.count
                causal = arange(end)[None, :] <= arange(c.start, end)[:, None]  # (count, end)
                self.prefill.append((at, c.count, row_slots[:end], causal))

    def inputs(self) -> dict:
        """The model's keyword arguments for this step (besides the tokens or their embeddings)."""
        return {"position_ids": self.positions[None], "attention_mask": self._prepared_mask, "paged": self}

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None):
        """query (1, H, T, d), key/value (1, KV, T, d) of the step's tokens -> (1, T, H, d)."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        keys.index_copy_(0, self.write, key[0].transpose(0, 1))
        values.index_copy_(0, self.write, value[0].transpose(0, 1))
        q = query[0].transpose(0, 1)  # (T, H, d)
        out = torch.empty_like(q)
        gqa = query.size(1) != key.size(1)
        if self.decode is not None:
            places, read, mask = self.decode
            k, v = self._gather(keys, values, read)  # (D, KV, L, d)
            o = F.scaled_dot_product_attention(
                q.index_select(0, places).unsqueeze(2), k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa
            )  # (D, H, 1, d)
            out.index_copy_(0, places, o[:, :, 0])
        for at, count, read, mask in self.prefill:
            k = keys.index_select(0, read).transpose(0, 1)[None]  # (1, KV, c, d)
            v = values.index_select(0, read).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(
                query[:, :, at : at + count], k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa
            )  # (1, H, n, d)
            out[at : at + count] = o[0].transpose(0, 1)
        if self.prefill_batch is not None:
            places, read, mask = self.prefill_batch  # (C, Q), (C, K), (C, 1, Q, K)
            k = keys.index_select(0, read.flatten()).view(*read.shape, *keys.shape[1:]).transpose(1, 2)
            v = values.index_select(0, read.flatten()).view(*read.shape, *values.shape[1:]).transpose(1, 2)
            queries = q.index_select(0, places.flatten()).view(*places.shape, *q.shape[1:]).transpose(1, 2)
            o = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
            out.index_copy_(0, places.flatten(), o.transpose(1, 2).flatten(0, 1))  # (C * Q, H, d)
        return out[None], None

    def _gather(self, keys: torch.Tensor, values: torch.Tensor, read: torch.Tensor):
        """The decode rows' K/V (D, KV, L, d). Eager: into one buffer every layer reuses
        (index_select into it is ~3x faster than a fresh gather of that size); compiled: inductor's."""
        if torch.compiler.is_compiling():
            rows = self.decode[0].numel()
            k, v = keys.index_select(0, read), values.index_select(0, read)  # (D * L, KV, d)
            return k.view(rows, -1, *k.shape[1:]).transpose(1, 2), v.view(rows, -1, *v.shape[1:]).transpose(1, 2)
        if self._gathered is None:
            self._gathered = (keys.new_empty(self._gather_shape), values.new_empty(self._gather_shape))
        k, v = self._gathered  # (D, L, KV, d)
        torch.index_select(keys, 0, read, out=k.view(-1, *k.shape[2:]))
        torch.index_select(values, 0, read, out=v.view(-1, *v.shape[2:]))
        return k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)


def _padded_prefill(multi: list, padding: tuple[torch.Tensor, int], device: torch.device):
    """A compiled step's prefill chunks and padding tokens as one batch padded to the longest chunk
    (Q queries) and the longest row (K keys): places (C, Q), slots to read (C, K), mask (C, 1, Q, K).
    A padded query is placed on the first padding token (whose output nobody reads) and sees key 0
    only; padded keys read the trash slot and are masked."""
    places, trash = padding
    groups = [
        (torch.arange(at, at + c.count, device=device), row_slots[: c.start + c.count], c.start)
        for at, row_slots, c in multi
    ] + [(places, torch.full((len(places),), trash, device=device), 0)] * 2  # twice: C >= 2 too
    rows, width = max(len(q) for q, _, _ in groups), max(len(k) for _, k, _ in groups)
    where = torch.full((len(groups), rows), int(places[0]), device=device)
    read = torch.full((len(groups), width), trash, device=device)
    query_at = torch.zeros(len(groups), rows, dtype=torch.long, device=device)  # each query's position in its row
    keys = torch.zeros(len(groups), dtype=torch.long, device=device)  # each group's number of keys
    for g, (queries, slots, start) in enumerate(groups):
        where[g, : len(queries)], read[g, : len(slots)], keys[g] = queries, slots, len(slots)
        query_at[g, : len(queries)] = torch.arange(start, start + len(queries), device=device)
    key_at = torch.arange(width, device=device)
    mask = (key_at[None, None, :] <= query_at[:, :, None]) & (key_at[None, :] < keys[:, None])[:, None, :]
    return where, read, mask[:, None]


class CompiledStep:
    """The model's forward for packed steps, compiled (torch.compile, `backend`) with dynamic shapes:
    every size a step varies in (tokens, rows, context) is symbolic and, with PAD padding tokens per
    step, never 0 or 1 (sizes torch.compile would specialize), so joins, leaves, chunk sizes and
    routings run one graph. New graphs come only from what changes the traced code: another mix of
    adapter types (and of their features, e.g. DoRA) in a step, or the output layer getting slots;
    up to RECOMPILE_LIMIT of them. If compiling fails, the error is logged once and the steps run
    eager from then on (the server keeps serving)."""

    PAD = 2
    RECOMPILE_LIMIT = 64

    def __init__(self, model: nn.Module, backend: str | Callable):
        self.model, self.forward = model, torch.compile(model, backend=backend, dynamic=True)

    def __call__(self, **inputs):
        if self.forward is self.model:
            return self.model(**inputs)
        # Without duck shaping, two sizes that happen to be equal when tracing stay two symbols; the
        # routes (tensors the adapter hooks find through the modules) are sized per step too.
        try:
            with (
                torch.fx.experimental._config.patch(use_duck_shape=False),
                torch._dynamo.config.patch(
                    force_nn_module_property_static_shapes=False, recompile_limit=self.RECOMPILE_LIMIT
                ),
            ):
                return self.forward(**inputs)
        except torch._dynamo.exc.BackendCompilerFailed:
            log.exception("compiling the step failed; the server runs its steps eager from now on")
            self.forward = self.model
            return self.model(**inputs)


UNSUPPORTED = ("softcap", "s_aux", "sinks", "sliding_window")  # attention variants the paged step does not do


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, paged=None, **kwargs):
    step = paged
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


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # outside a step; a step passes its own


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
    if model.config._attn_implementation != NAME or not _kwargs_reach_attention(model):
        raise TypeError(
            f"{type(model).__name__} does not take a pluggable attention function (transformers' "
            "AttentionInterface) that gets the forward's keyword arguments, which the server's paged KV cache needs"
        )


def _kwargs_reach_attention(model: nn.Module) -> bool:
    """Whether a forward given a step reaches every layer's attention with it (one token, a scratch pool)."""
    seen = set()

    class Probe(Step):
        def attend(self, layer, *args):
            seen.add(layer)
            return super().attend(layer, *args)

    weight = next(model.parameters())
    step = Probe(KVPool(model, 1, 1), [Chunk([0], 0, 1)], weight.device)
    with torch.no_grad():
        try:
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=weight.device), use_cache=False, **step.inputs())
        except TypeError:  # a forward that takes no keyword arguments beyond its own
            return False
    return seen == set(range(kv_shape(model)[0]))
