"""Choosing each row's next token, and turning a row's tokens into text that stops where asked.

Greedy rows (temperature 0) take the argmax; sampled rows draw from their temperature-scaled,
top-p-truncated distribution with their request's own generator, so a `seed` gives the same
text whatever other requests share the batch (up to the rounding that batch composition changes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sampling:
    """What a request asks of generation (OpenAI's parameters)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)


def next_tokens(
    logits: torch.Tensor, temperatures: list[float], top_ps: list[float], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """(B,) next token per row from logits (B, vocab) fp32; a row's generator is used for it alone."""
    chosen = logits.argmax(-1)  # (B,)
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([temperatures[i] for i in sampled], device=logits.device)[:, None]
        probs = torch.softmax(logits[index] / temps, -1)  # (S, vocab)
        probs = _top_p(probs, torch.tensor([top_ps[i] for i in sampled], device=logits.device))
        for row, p in zip(sampled, probs):
            chosen[row] = torch.multinomial(p.cpu(), 1, generator=generators[row])[0].to(chosen.device)
    return chosen


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs (S, vocab) keeping, per row, the most likely tokens whose mass first reaches top_p (S,)."""
    if bool((top_p >= 1).all()):
        return probs
    ordered, order = probs.sort(-1, descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the more likely tokens
    # The most likely token always stays, even when top_p underflows to 0 in the logits' dtype.
    ordered = ordered.masked_fill((before >= top_p[:, None]) & (before > 0), 0)
    return torch.zeros_like(probs).scatter_(-1, order, ordered)


@dataclass
class TextStream:
    """One choice's text: decoded from all its tokens at each step, released in pieces that never
    end inside a character or a possible stop string, cut before the first stop string."""

    tokenizer: object
    stop: tuple[str, ...]
    tokens: list[int] = field(default_factory=list)
    released: str = ""
    stopped: bool = False

    def add(self, token: int | None) -> str:
        """Adds a token (None: the last one came, flush); returns the text newly released."""
        if token is not None:
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [text.find(s, max(len(self.released) - len(s), 0)) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.stopped = True
            return self._release(text[: min(hits)])
        if token is None:
            return self._release(text)
        if text.endswith("\ufffd"):  # a character split across tokens
            return ""
        return self._release(text[: len(text) - max((_held(text, s) for s in self.stop), default=0)])

    def _release(self, text: str) -> str:
        piece = text[len(self.released) :]  # decoding is prefix-stable: released text never changes
        self.released += piece
        return piece


def _held(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than it): text that may yet
    become the stop string, so it is not released."""
    at = text.find(stop[0], max(len(text) - len(stop) + 1, 0))
    while at >= 0:  # the leftmost place whose rest begins the stop string is the longest
        if stop.startswith(text[at:]):
            return len(text) - at
        at = text.find(stop[0], at + 1)
    return 0
