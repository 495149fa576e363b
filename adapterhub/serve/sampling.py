"""Choosing each row's next token, and turning a row's tokens into text that stops where asked.

Greedy rows (temperature 0) take the argmax; sampled rows draw from their temperature-scaled,
top-p-truncated distribution with their request's own generator, so a `seed` gives the same
text whatever other requests share the batch (up to the rounding that batch composition changes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .logits import truncate


@dataclass(frozen=True)
class Sampling:
    """What a request asks of generation (OpenAI's parameters, and vLLM's extensions)."""

    max_tokens: int  # 0: none (with prompt_logprobs: score the prompt only, as lm-eval's echo requests do)
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1  # choices generated (best_of when it is more than the choices returned)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's (1: none)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    top_k: int = 0  # vLLM's (0: all tokens)
    min_p: float = 0.0  # vLLM's
    min_tokens: int = 0  # vLLM's: no end of sequence or stop token before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # vLLM's: tokens that end the choice like end of sequence
    logprobs: int | None = None  # per generated token: its logprob and this many alternatives; None: none
    prompt_logprobs: int | None = None  # the same for each prompt token after the first; None: none
    grammar: object | None = field(default=None, compare=False)  # a grammar.Compiled the output must match


def next_tokens(
    logits: torch.Tensor, samplings: list[Sampling], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """(B,) next token per row from processed logits (B, vocab) fp32 (logits.process): the argmax for
    greedy rows, a draw from the truncated distribution (logits.truncate) for the others, each with
    its own generator."""
    chosen = logits.argmax(-1)  # (B,)
    sampled = [i for i, s in enumerate(samplings) if s.temperature > 0]
    if sampled:
        device = logits.device
        rows = [samplings[i] for i in sampled]
        probs = truncate(
            logits[torch.tensor(sampled, device=device)],
            torch.tensor([s.temperature for s in rows], device=device),
            torch.tensor([s.top_k for s in rows], device=device),
            torch.tensor([s.min_p for s in rows], device=device),
            torch.tensor([s.top_p for s in rows], device=device),
        )
        for row, p in zip(sampled, probs):
            chosen[row] = torch.multinomial(p.cpu(), 1, generator=generators[row])[0].to(chosen.device)
    return chosen


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
