"""Turning a step's raw logits into the distributions its rows sample from, and their logprobs.

Every parameter is per row (each request asks its own), and every stage is one tensor operation over
the rows that use it: no Python loop per token or per vocabulary entry. transformers' logits
processors (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, MinPLogitsWarper) take one value for
the whole batch, so they do not fit a batch whose rows each ask their own; the stages here follow
their definitions (and vLLM's order) row by row:

    grammar mask -> min_tokens (no end of sequence yet) -> logit_bias -> repetition, frequency and
    presence penalties -> temperature -> top_k -> min_p -> top_p

Logprobs are those of the raw logits (the model's own distribution under the row's adapter, as
vLLM reports by default), so they do not depend on the sampling parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .grammar import Grammars

if TYPE_CHECKING:
    from .sampling import Sampling

NEG_INF = float("-inf")


@dataclass
class RowView:
    """What processing needs of one row: its request's parameters, its tokens so far. `prompt` and
    `output` are only read for rows with penalties (tensors, so that a step costs no Python work per
    token); `generated` counts the output for min_tokens."""

    sampling: Sampling
    prompt: torch.Tensor | Sequence[int]  # the prompt's ids (repetition penalty counts them, as vLLM does)
    output: torch.Tensor | Sequence[int]  # the tokens generated so far
    generated: int | None = None  # len(output) when None

    @property
    def count(self) -> int:
        return len(self.output) if self.generated is None else self.generated


def process(
    logits: torch.Tensor,
    rows: list[RowView],
    eos: set[int],
    masked: Sequence[int] = (),
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits (R, vocab) fp32 each row samples from, before temperature and truncation: a new
    tensor when any stage applies (the raw ones stay for logprobs). `bitmask` (len(masked),
    ceil(vocab/32)) int32: the allowed tokens of the rows `masked` (grammar.Grammars.fill)."""
    out = logits
    if masked:
        out = out.clone()
        index = _long(masked, out)
        constrained = out[index]
        Grammars.apply(constrained, bitmask)
        out[index] = constrained
    early = [i for i, r in enumerate(rows) if r.count < r.sampling.min_tokens]
    if early:
        out = out.clone() if out is logits else out
        _forbid_ends(out, early, rows, eos)
    biased = [i for i, r in enumerate(rows) if r.sampling.logit_bias]
    if biased:
        out = out.clone() if out is logits else out
        parts = [_bias_tensors(rows[i].sampling.logit_bias) for i in biased]
        index = torch.repeat_interleave(_long(biased, out), _long([len(ids) for ids, _ in parts], out))
        tokens = torch.cat([ids for ids, _ in parts]).to(out.device)
        values = torch.cat([v for _, v in parts]).to(out.device, out.dtype)
        out.index_put_((index, tokens), values, accumulate=True)
    paying = [i for i, r in enumerate(rows) if penalized(r.sampling)]
    if paying:
        out = out.clone() if out is logits else out
        out[paying] = _penalties(out[paying], [rows[i] for i in paying])
    return out


@functools.lru_cache(maxsize=4096)
def _bias_tensors(bias: tuple[tuple[int, float], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's logit_bias as (token ids, biases), built once (requests reuse their Sampling)."""
    tokens, values = zip(*bias)
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(values, dtype=torch.float32)


def penalized(s: Sampling) -> bool:
    """Whether a request asks for any penalty (its rows then keep their tokens as tensors)."""
    return s.repetition_penalty != 1 or s.frequency_penalty != 0 or s.presence_penalty != 0


def _long(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=like.device)


def _forbid_ends(logits: torch.Tensor, early: list[int], rows: list[RowView], eos: set[int]) -> None:
    """Rows short of their min_tokens may not end: end-of-sequence and their stop tokens get -inf
    (unless the row ignores end of sequence, which then only its stop tokens lose). A row left with
    no token at all (its grammar allows only an end now) keeps its ends: the grammar wins."""
    places = [
        (i, t)
        for i in early
        for t in (set() if rows[i].sampling.ignore_eos else eos) | set(rows[i].sampling.stop_token_ids)
    ]
    if places:
        index = _long(early, logits)
        before = logits[index]  # (E, vocab): a copy
        rows_, token = zip(*places)
        logits[_long(rows_, logits), _long(token, logits)] = NEG_INF
        dead = torch.isneginf(logits[index]).all(-1)  # (E,)
        if bool(dead.any()):
            logits[index[dead]] = before[dead]


def _penalties(logits: torch.Tensor, rows: list[RowView]) -> torch.Tensor:
    """logits (P, vocab) with each row's penalties: repetition (vLLM's: a seen token's positive logit
    divided by it, a negative one multiplied; seen = in the prompt or the output), then frequency
    (times the token's count in the output) and presence (once if it is in the output), subtracted,
    as OpenAI defines them."""
    vocab = logits.size(-1)
    device = logits.device
    outputs = _padded([r.output for r in rows], vocab, device)  # (P, L); padding = vocab
    counts = torch.zeros(len(rows), vocab + 1, device=device).scatter_add_(
        1, outputs, torch.ones_like(outputs, dtype=logits.dtype)
    )
    counts = counts[:, :vocab]  # (P, vocab)
    repetition = torch.tensor([r.sampling.repetition_penalty for r in rows], device=device)[:, None]
    if bool((repetition != 1).any()):
        prompts = _padded([r.prompt for r in rows], vocab, device)
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device).scatter_(1, prompts, True)
        seen = seen[:, :vocab] | (counts > 0)
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    frequency = torch.tensor([r.sampling.frequency_penalty for r in rows], device=device)[:, None]
    presence = torch.tensor([r.sampling.presence_penalty for r in rows], device=device)[:, None]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def _padded(lists: list[torch.Tensor | Sequence[int]], pad: int, device) -> torch.Tensor:
    """(len(lists), longest) long tensor of the token lists, right-padded with `pad`."""
    tensors = [torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in lists]
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad).to(device)


def truncate(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, min_p: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Probabilities (S, vocab) of sampled rows: logits (S, vocab) over temperature (S,), keeping each
    row's top_k (S,) tokens (0: all), those at least min_p (S,) times the likeliest, and the likeliest
    whose mass first reaches top_p (S,). The likeliest token always stays."""
    probs = torch.softmax(logits / temperature[:, None], -1)
    limited = (top_k > 0).any() or (min_p > 0).any() or (top_p < 1).any()
    if not bool(limited):
        return probs
    ordered, order = probs.sort(-1, descending=True)  # (S, vocab)
    rank = torch.arange(probs.size(-1), device=probs.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    drop |= ordered < min_p[:, None] * ordered[:, :1]
    before = ordered.cumsum(-1) - ordered  # mass of the more likely tokens
    drop |= before >= top_p[:, None]
    drop[:, 0] = False  # even when top_p underflows to 0 in the logits' dtype
    return torch.zeros_like(probs).scatter_(-1, order, ordered.masked_fill(drop, 0))


@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's logprob under the raw distribution, and the `top` likeliest (id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, tops: list[int]) -> list[TokenLogprobs]:
    """For rows of logits (R, vocab) fp32 and their chosen tokens (R,): each token's logprob and the
    row's tops[i] likeliest alternatives (one log_softmax and one topk for all rows)."""
    logp = torch.log_softmax(logits, -1)  # (R, vocab)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
    k = max(tops, default=0)
    values, ids = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [
        TokenLogprobs(t, lp, tuple(zip(ids[i][: tops[i]], values[i][: tops[i]])))
        for i, (t, lp) in enumerate(zip(tokens.tolist(), chosen))
    ]
