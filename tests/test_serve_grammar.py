"""Structured output (adapterhub.serve.grammar): whatever a random model samples under a constraint's masks
parses and validates; masks forbid what accept refuses and every id the tokenizer lacks; bad constraints
say what is wrong; apply matches a per-token loop; the compile cache is shared across threads."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer

from adapterhub.serve import grammar
from adapterhub.serve.grammar import Constraint, GrammarError, Grammars

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "viewer", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def vocab():
    width = tiny_llama().config.vocab_size
    assert width == 128 > len(tiny_tokenizer()) == 98  # the model's logits are wider than the tokenizer
    return width


@pytest.fixture(scope="module")
def grammars(tok, vocab):
    return Grammars(tok, vocab, {tok.eos_token_id})


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(R, words) int32 -> (R, vocab) bool, token t allowed when bit t % 32 of word t // 32 is set."""
    bits = (bitmask.unsqueeze(-1).long() >> torch.arange(32)) & 1  # (R, words, 32)
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()


def generate(
    grammars: Grammars, tok, constraint: Constraint, rows: int, seed: int, bias=None, greedy=False, steps=3000
):
    """Samples `rows` outputs together from random logits (plus `bias`) under the constraint's masks until each
    matcher is done or takes an end-of-sequence; returns their texts. Checks on the way that ids beyond the
    tokenizer are never allowed and that a done matcher allows only the end."""
    eos, known = tok.eos_token_id, len(tok)
    compiled = grammars.compile(constraint)
    matchers = [grammars.matcher(compiled) for _ in range(rows)]
    outputs: list[list[int]] = [[] for _ in range(rows)]
    live = list(range(rows))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if not live:
            return [tok.decode(out) for out in outputs]
        bitmask = grammars.fill([matchers[i] for i in live])
        ok = allowed(bitmask, grammars.vocab_size)
        assert not ok[:, known:].any(), "an id the tokenizer lacks was allowed"
        logits = torch.randn(len(live), grammars.vocab_size, generator=g) * 3 + (0 if bias is None else bias)
        Grammars.apply(logits, bitmask)
        picks = logits.argmax(-1) if greedy else torch.multinomial(logits.softmax(-1), 1, generator=g)[:, 0]
        for row, i in enumerate(list(live)):
            token = int(picks[row])
            assert ok[row, token]
            matchers[i].accept(token)
            if token == eos:
                live.remove(i)
                continue
            outputs[i].append(token)
            if matchers[i].done():
                only_end = allowed(grammars.fill([matchers[i]]), grammars.vocab_size)[0].nonzero().flatten().tolist()
                assert only_end == [eos]
                live.remove(i)
    raise AssertionError(f"{len(live)} rows not done after {steps} steps")


def test_json_object_and_schema_outputs_parse_and_validate(grammars, tok):
    for constraint, schema in [
        (Constraint("json_object"), {"type": "object"}),
        (Constraint("json_schema", json.dumps(SCHEMA)), SCHEMA),
    ]:
        for seed in range(3):
            for text in generate(grammars, tok, constraint, rows=8, seed=seed):
                jsonschema.validate(json.loads(text), schema)


def test_a_whitespace_loving_greedy_model_still_finishes(grammars, tok, vocab):
    """Whitespace is bounded between JSON lexemes, so argmax with a large bonus on ' ' must move on."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "e": {"enum": ["a", "b"]}},
        "required": ["n", "e"],
        "additionalProperties": False,
    }
    bias = torch.zeros(vocab)
    bias[tok.convert_tokens_to_ids(" ")] = 100.0
    texts = generate(
        grammars, tok, Constraint("json_schema", json.dumps(schema)), rows=4, seed=0, bias=bias, greedy=True
    )
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
        assert " " * grammar.MAX_WHITESPACE in text and " " * (grammar.MAX_WHITESPACE + 1) not in text


def test_regex_and_choice_outputs_match(grammars, tok):
    pattern = r"[A-Z][a-z]{2,8}-[0-9]{1,3}(\.[0-9]+)?"
    choices = ("red", "green", "blue", "red wine")
    for seed in range(3):
        for text in generate(grammars, tok, Constraint("regex", pattern), rows=8, seed=seed):
            assert re.fullmatch(pattern, text)
        for text in generate(grammars, tok, Constraint("choice", choices), rows=8, seed=seed):
            assert text in choices


def test_lark_and_gbnf_grammars(grammars, tok):
    lark = 'start: item ("," item)*\nitem: /[a-c]/ | "(" start ")"\n'
    for text in generate(grammars, tok, Constraint("grammar", lark), rows=8, seed=0):
        assert re.fullmatch(r"[a-c(),]+", text) and text.count("(") == text.count(")")
    gbnf = 'root ::= "x" [0-9]+ ("," "x" [0-9]+)*'
    for text in generate(grammars, tok, Constraint("grammar", gbnf), rows=8, seed=0):
        assert re.fullmatch(r"x[0-9]+(,x[0-9]+)*", text)


def test_a_token_the_mask_forbids_is_refused(grammars, tok, vocab):
    compiled = grammars.compile(Constraint("json_object"))

    def at(prefix: str):
        matcher = grammars.matcher(compiled)
        for token in tok.encode(prefix, add_special_tokens=False):
            matcher.accept(token)
        return matcher

    for prefix in ["", '{"k', '{"k": 1']:
        ok = allowed(grammars.fill([at(prefix)]), vocab)[0]
        assert ok.any() and not ok.all()
        forbidden = [t for t in range(vocab) if not ok[t]]
        for token in (forbidden[0], forbidden[len(forbidden) // 2], vocab - 1, vocab, -1):
            with pytest.raises(GrammarError, match=f"token {token} is not allowed"):
                at(prefix).accept(token)


@pytest.mark.parametrize(
    ("constraint", "says"),
    [
        (Constraint("json_schema", '{"type": "object", "if": {}}'), r'Unimplemented keys: \["if"\].*rewrite'),
        (Constraint("json_schema", '{"type": "strnig"}'), "Invalid type: strnig"),
        (Constraint("json_schema", '{"type": "object",'), "not valid JSON"),
        (Constraint("json_schema", "[1]"), "must be a JSON object"),
        (Constraint("json_schema", '{"properties": {"a": {"type": "string", "pattern": "(?=x)"}}}'), "look-around"),
        (Constraint("regex", "(?<=a)b"), "look-around.*Rust regex syntax"),
        (Constraint("regex", r"(a)\1"), "backreferences are not supported"),
        (Constraint("regex", "(ab"), "unclosed group"),
        (Constraint("choice", ()), "non-empty list of strings"),
        (Constraint("grammar", "start: missing"), 'unknown name: "missing".*Lark'),
        (Constraint("yaml", "x"), "unknown constraint kind 'yaml'"),  # type: ignore[arg-type]
    ],
)
def test_bad_constraints_say_what_is_wrong(grammars, constraint, says):
    with pytest.raises(GrammarError, match=re.compile(says, re.S)):
        grammars.compile(constraint)


@pytest.mark.parametrize(("rows", "vocab"), [(5, 128), (3, 100), (1, 33)])
def test_apply_equals_a_per_token_loop(rows, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(rows, vocab, generator=g)
    logits[0, 0] = float("inf")
    bitmask = torch.randint(-(2**31), 2**31, (rows, (vocab + 31) // 32), dtype=torch.int64, generator=g).int()
    bitmask[-1] = 0  # a row with nothing allowed
    expected = logits.clone()
    for r in range(rows):
        for t in range(vocab):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = float("-inf")
    Grammars.apply(logits, bitmask)
    assert torch.equal(logits, expected)


def test_compile_cache_is_shared_bounded_and_thread_safe(grammars, tok, vocab, monkeypatch):
    constraints = [Constraint("regex", f"[a-z]{{{n}}}") for n in range(1, 7)] + [Constraint("choice", ["x", "y"])]
    assert Constraint("choice", ["x", "y"]) == Constraint("choice", ("x", "y"))
    results: list[list] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def compile_all():
        try:
            barrier.wait()
            results.append([grammars.compile(c) for c in constraints * 5])
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=compile_all) for _ in range(5)]
    for t in threads:
        t.start()
    barrier.wait()
    busy = [grammars.matcher(grammars.compile(Constraint("json_object"))) for _ in range(8)]
    for _ in range(20):  # the engine thread filling masks meanwhile
        grammars.fill(busy)
    for t in threads:
        t.join()
    assert not errors
    for got in results:
        assert all(a is b for a, b in zip(got, results[0], strict=True))
    assert all(grammars.compile(c) is results[0][i] for i, c in enumerate(constraints))

    monkeypatch.setattr(grammar, "CACHE_SIZE", 2)
    first = grammars.compile(Constraint("regex", "x"))
    assert grammars.compile(Constraint("regex", "x")) is first
    grammars.compile(Constraint("regex", "y"))
    grammars.compile(Constraint("regex", "z"))
    assert grammars.compile(Constraint("regex", "x")) is not first  # least recently used, dropped


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from adapterhub.default_model import GGUF_FILE, default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE)


def test_smollm2_schema_outputs_validate_and_padding_ids_are_masked(smollm2_tokenizer):
    """A byte-level BPE tokenizer read by llguidance itself, under logits 64 ids wider than its vocabulary."""
    tok = smollm2_tokenizer
    known = len(tok)
    grammars = Grammars(tok, known + 64, {tok.eos_token_id})
    schema = json.loads(json.dumps(SCHEMA))
    schema["properties"]["name"]["maxLength"] = 8
    compiled = grammars.compile(Constraint("json_schema", json.dumps(schema)))
    assert grammars.compile(Constraint("json_schema", json.dumps(schema))) is compiled
    g = torch.Generator().manual_seed(0)
    matchers = [grammars.matcher(compiled) for _ in range(4)]
    outputs: list[list[int]] = [[] for _ in matchers]
    for _ in range(400):
        live = [i for i, m in enumerate(matchers) if not m.done()]
        if not live:
            break
        bitmask = grammars.fill([matchers[i] for i in live])
        ok = allowed(bitmask, grammars.vocab_size)
        assert not ok[:, known:].any() and not ok[:, tok.eos_token_id].any()
        logits = torch.randn(len(live), grammars.vocab_size, generator=g) * 3
        Grammars.apply(logits, bitmask)
        for row, i in enumerate(live):
            token = int(logits[row].argmax())  # random logits: a uniform pick among the allowed tokens
            matchers[i].accept(token)
            outputs[i].append(token)
    assert all(m.done() for m in matchers)
    for out in outputs:
        jsonschema.validate(json.loads(tok.decode(out)), schema)
