"""Structured output: per-request constraints compiled to token masks, with llguidance.

llguidance rather than xgrammar, by bench/grammar_masks.py (bench/results/grammar-masks-2026-11-29.md; SmolLM2
tokenizer, 2 cores, batch 64): filling 64 rows' masks takes 0.6-0.7 ms a step against 0.9-1.0 ms for a JSON
schema and 0.4-0.5 against 1.1-1.2 ms for json_object (p99 about 4 ms in both); it compiles every case tested
in under 1 ms where xgrammar takes 3-40 ms (xgrammar precomputes masks, llguidance computes them lazily); and
it is one wheel without dependencies, where xgrammar pulls in triton (about 1 GB) on Linux. Masks are applied
by our own vectorized `Grammars.apply` (no torch.compile, no library kernel).

JSON whitespace: the library's default characters (space, newline, tab, carriage return), but at most
`MAX_WHITESPACE` of them between two JSON lexemes (brace, key, colon, value, comma), so that a model that
prefers whitespace cannot loop in it forever: after that many it must write the next lexeme. Strings and arrays
are not bounded beyond what the schema says; max_tokens cuts those.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import llguidance
import llguidance.hf
import llguidance.torch
import torch

MAX_WHITESPACE = 16  # a newline and the indent of pretty-printed JSON 3 levels deep at 4 spaces
JSON_OPTIONS = {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_WHITESPACE}}}"}
CACHE_SIZE = 256  # compiled constraints kept (least recently used dropped)

HINTS = {
    "json_schema": "JSON Schema as llguidance supports it (github.com/guidance-ai/llguidance, docs/json_schema.md: "
    "no if/then/else or dependent* keywords, a known set of formats, patterns in Rust regex syntax); "
    "remove or rewrite the keyword named",
    "regex": "the pattern must match the whole output, in Rust regex syntax (docs.rs/regex): "
    r"no look-around (also \b), backreferences or possessive quantifiers",
    "choice": "give one or more strings",
    "grammar": "a Lark grammar with a `start` rule, in llguidance's dialect (docs/syntax.md), "
    "or a llama.cpp GBNF grammar with a `root` rule",
}


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match.

    value -- json_schema: the schema as JSON text; regex: the pattern (Rust regex syntax, matched in full);
    choice: the allowed strings (a list is stored as a tuple); grammar: a Lark grammar in llguidance's dialect
    or a GBNF grammar; json_object: None.
    """

    kind: Literal["json_object", "json_schema", "regex", "choice", "grammar"]
    value: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.value, list):  # keeps the constraint hashable, hence cacheable
            object.__setattr__(self, "value", tuple(self.value))


class GrammarError(ValueError):
    """A constraint that cannot compile, or a token its matcher does not allow."""


class Compiled:
    """A compiled constraint: a validated matcher in its start state, which only ever gets copied."""

    __slots__ = ("_start", "constraint")

    def __init__(self, constraint: Constraint, start: llguidance.LLMatcher):
        self.constraint = constraint
        self._start = start


class Matcher:
    """One request's position in its constraint."""

    __slots__ = ("_m",)

    def __init__(self, m: llguidance.LLMatcher):
        self._m = m

    def accept(self, token: int) -> None:
        """Advances by one token; raises GrammarError (and stays in error) if the token is not allowed."""
        try:
            ok = self._m.consume_token(token)
        except OverflowError as e:  # a negative id or one beyond 64 bits
            raise GrammarError(f"token {token} is not allowed: {e}") from e
        if not ok:
            raise GrammarError(
                f"token {token} is not allowed: {self._m.get_error().removesuffix('<non-verbose/>').strip()}"
            )

    def done(self) -> bool:
        """The output is complete: nothing but end-of-sequence may follow, or it was accepted (also True after
        accept raised, when the matcher is in error)."""
        return self._m.is_stopped()


class Grammars:
    """Compiles constraints for one tokenizer and fills the next-token bitmasks of batches of matchers."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        """tokenizer: a transformers fast tokenizer; vocab_size: the model's logits width (ids the tokenizer
        lacks are always masked off); eos_ids: ids allowed wherever the constraint may end."""
        self.vocab_size = vocab_size
        self._tok = _lltokenizer(tokenizer, vocab_size, sorted(eos_ids))
        self._executor = llguidance.LLExecutor(num_threads=min(32, os.cpu_count() or 1))
        self._cache: OrderedDict[Constraint, Compiled] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> Compiled:
        """The compiled constraint, from a bounded LRU cache; raises GrammarError saying what to fix.
        Thread-safe: compiling happens outside the lock, and the first result stored wins."""
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                return self._cache[constraint]
        compiled = Compiled(constraint, self._start(constraint))
        with self._lock:
            compiled = self._cache.setdefault(constraint, compiled)
            self._cache.move_to_end(constraint)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, compiled: Compiled) -> Matcher:
        """A new matcher at the constraint's start: a copy, so the compiled start state is never advanced."""
        return Matcher(compiled._start.deep_copy())

    def fill(self, matchers: list[Matcher]) -> torch.Tensor:
        """The next-token bitmasks, (len(matchers), ceil(vocab_size / 32)) int32 on CPU: bit t % 32 of word t // 32
        is set when token t is allowed. Filled by llguidance's thread pool, one matcher per task."""
        bitmask = torch.empty(len(matchers), (self.vocab_size + 31) // 32, dtype=torch.int32)
        if matchers:
            rows = [(m._m, i) for i, m in enumerate(matchers)]
            llguidance.torch.fill_next_token_bitmask_par(self._executor, rows, bitmask)
        return bitmask

    @staticmethod
    def apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Sets disallowed logits to -inf in place. logits (R, V), bitmask (R, ceil(V / 32)) int32.
        Each mask byte selects 8 caps from a table (+inf where allowed, -inf not), and logits are clamped to
        them: one gather and one clamp, several times faster on CPU than masked_fill with an unpacked bool mask."""
        rows, vocab = logits.shape
        table = _CAPS.to(logits.device, logits.dtype)  # (256, 8)
        mask_bytes = bitmask.to(logits.device).view(torch.uint8).long()  # (R, 4 * words)
        caps = torch.nn.functional.embedding(mask_bytes, table).view(rows, -1)[:, :vocab]  # (R, V)
        logits.clamp_(max=caps)

    def _start(self, c: Constraint) -> llguidance.LLMatcher:
        """A matcher for c in its start state; GrammarError if c does not compile."""
        try:
            grammar = _grammar(c)
        except GrammarError:
            raise
        except ValueError as e:  # the library refused the text before compiling it (e.g. GBNF that is not Lark)
            raise GrammarError(_message(c, str(e))) from e
        start = llguidance.LLMatcher(self._tok, grammar, log_level=0, limits=_LIMITS)
        if start.is_error():
            raise GrammarError(_message(c, start.get_error()))
        return start


# bit b of byte value v set -> +inf (logit kept), clear -> -inf (masked); little-endian words make byte k of
# word w hold tokens 32 w + 8 k .. 32 w + 8 k + 7
_CAPS = torch.where((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1 == 1, float("inf"), float("-inf"))
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # errors without the parser's state and the grammar


def _grammar(c: Constraint) -> str:
    """llguidance's grammar text for c; GrammarError when c is malformed before the library sees it."""
    if c.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if c.kind == "choice":
        if not isinstance(c.value, tuple) or not c.value or not all(isinstance(s, str) for s in c.value):
            raise GrammarError("a choice constraint needs a non-empty list of strings")
        return llguidance.grammar_from("choice", list(c.value))
    if c.kind not in HINTS:
        raise GrammarError(f"unknown constraint kind {c.kind!r}: json_object, json_schema, regex, choice or grammar")
    if not isinstance(c.value, str):
        raise GrammarError(f"a {c.kind} constraint needs its {c.kind.removeprefix('json_')} as a string")
    if c.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(c.value)
    if c.kind == "grammar":
        return llguidance.grammar_from("grammar", c.value)
    try:
        schema = json.loads(c.value)
    except json.JSONDecodeError as e:
        raise GrammarError(f"the json_schema is not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise GrammarError(f'the json_schema must be a JSON object such as {{"type": "object"}}, not {c.value[:40]}')
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def _message(c: Constraint, error: str) -> str:
    return f"{c.kind} constraint does not compile: {error.strip()} ({HINTS[c.kind]})"


def _lltokenizer(tokenizer, vocab_size: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the tokenizer, vocab_size ids wide. llguidance reads byte-level BPE, byte-fallback
    and metaspace tokenizers itself; for a decoder it cannot read (e.g. Fuse, as in character-level tokenizers)
    each token is described by decoding it alone, which is right when tokens decode independently."""
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
    except ValueError:
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Decoded(tokenizer, vocab_size)), eos_token=eos_ids)


class _Decoded:
    """The interface llguidance.TokenizerWrapper reads: every token's bytes, specials marked, and encode.
    Ids from len(tokenizer) to vocab_size are empty tokens, which no grammar allows."""

    def __init__(self, tokenizer, vocab_size: int):
        special = set(tokenizer.all_special_ids)
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(special)
        self.tokens = [
            (tokenizer.convert_ids_to_tokens(i) if i in special else tokenizer.decode([i])).encode()
            for i in range(len(tokenizer))
        ] + [b""] * (vocab_size - len(tokenizer))
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)
