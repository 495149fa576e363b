"""The OpenAI fields real clients send, against `adapterhub serve` in a subprocess: logprobs equal the
offline Backbone's log_softmax for the row's adapter (whole, streamed, echoed prompts, max_tokens 0),
penalties and logit_bias as OpenAI defines them, vLLM's sampling fields, best_of, grammar-constrained
output (json_schema, json_object, regex, choice), tools, content parts and continuous usage."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch
from serving import EOS, Offline, Server, make_model_dir

PROMPT = "hello there"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fields")
    dirs = make_model_dir(root)
    config = json.loads((root / "base" / "config.json").read_text())  # room for JSON answers (RoPE: no
    config["max_position_embeddings"] = 2048  # weights depend on it, so the offline model stays the same)
    (root / "base" / "config.json").write_text(json.dumps(config))
    adapters = [a for name in ("a0", "a1", "a2") for a in ("--adapter", f"{name}={dirs[name]}")]
    server = Server(
        ["--base", str(root / "base"), "--served-model-name", "tiny", *adapters, "--max-rank", "8"], cwd=root
    )
    yield server, Offline(dirs)
    server.stop()


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup[0].url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(setup):
    with httpx.Client(base_url=setup[0].url, timeout=120) as c:
        yield c


def _logprobs(offline: Offline, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """log_softmax of the offline forward over `ids`: (len(ids), vocab), row p scoring token p + 1."""
    with offline.backbone.use(adapter), torch.no_grad():
        return torch.log_softmax(offline.backbone.model(torch.tensor([ids])).logits[0].float(), -1)


def _greedy(offline: Offline, adapter: str | None, ids: list[int], steps: int) -> list[int]:
    """The offline greedy tokens after `ids` (end of sequence ignored)."""
    new = []
    for _ in range(steps):
        new.append(int(_logprobs(offline, adapter, ids + new)[-1].argmax()))
    return new


@pytest.mark.parametrize("adapter", ["a0", "a1", None])
def test_completion_logprobs_equal_offline(setup, client, adapter):
    offline = setup[1]
    model = adapter or "tiny"
    answer = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    choice = answer.choices[0]
    prompt = offline.ids(PROMPT)
    generated = _greedy(offline, adapter, prompt, 6)
    assert choice.logprobs.tokens == [offline.tokenizer.decode([t]) for t in generated]
    expected = _logprobs(offline, adapter, prompt + generated)
    for i, (token, logprob, top) in enumerate(
        zip(generated, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs)
    ):
        row = expected[len(prompt) - 1 + i]
        assert logprob == pytest.approx(row[token].item(), abs=1e-4)
        best = row.topk(3)
        wanted = {offline.tokenizer.decode([t]): v for t, v in zip(best.indices.tolist(), best.values.tolist())}
        assert set(top) == set(wanted)  # greedy: the chosen token is among the top 3
        assert all(top[k] == pytest.approx(v, abs=1e-4) for k, v in wanted.items())
    offsets = [sum(len(t) for t in choice.logprobs.tokens[:i]) for i in range(6)]
    assert choice.logprobs.text_offset == offsets


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt_as_lm_eval_asks(setup, http, max_tokens):
    """lm-eval's loglikelihood request: token ids, echo, logprobs 1, temperature 0."""
    offline = setup[1]
    prompts = [offline.ids("The quick brown fox"), offline.ids("abc")]
    body = {"model": "a2", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0}
    answer = http.post("/completions", json=body).json()
    assert answer["usage"]["completion_tokens"] == max_tokens * 2
    for ids, choice in zip(prompts, answer["choices"]):
        logprobs = choice["logprobs"]
        expected = _logprobs(offline, "a2", ids)
        assert len(logprobs["token_logprobs"]) == len(ids) + max_tokens
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        for p in range(1, len(ids)):
            assert logprobs["token_logprobs"][p] == pytest.approx(expected[p - 1, ids[p]].item(), abs=1e-4)
            greedy = offline.tokenizer.decode([int(expected[p - 1].argmax())])
            assert max(logprobs["top_logprobs"][p], key=logprobs["top_logprobs"][p].get) == greedy
        assert choice["text"].startswith(offline.tokenizer.decode(ids))
        assert choice["finish_reason"] == "length" if max_tokens == 0 else choice["finish_reason"] in {"length", "stop"}
    health = httpx.get(setup[0].url.removesuffix("/v1") + "/health").json()
    assert health["running_rows"] == 0  # rows that only scored their prompt left the batch


def test_streamed_logprobs_equal_whole(client):
    kw = {"model": "a0", "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(prompt=PROMPT, logprobs=2, **kw).choices[0].logprobs
    tokens, values = [], []
    for chunk in client.completions.create(prompt=PROMPT, logprobs=2, stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
    assert tokens == whole.tokens and values == whole.token_logprobs
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **kw)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 8 and all(len(e.top_logprobs) == 2 for e in entries)
    assert "".join(e.token for e in entries) == chat.choices[0].message.content
    streamed = []
    for chunk in client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def _greedy_penalized(offline: Offline, adapter, prompt: str, steps: int, frequency=0.0, presence=0.0, repetition=1.0):
    """Greedy decoding with OpenAI's penalties (and vLLM's repetition penalty) applied by hand, one row."""
    ids, new = offline.ids(prompt), []
    for _ in range(steps):
        with offline.backbone.use(adapter), torch.no_grad():
            logits = offline.backbone.model(torch.tensor([ids + new])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=logits.numel()).float()
        seen = counts > 0
        seen[torch.tensor(ids)] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        logits = logits - frequency * counts - presence * (counts > 0).float()
        new.append(int(logits.argmax()))
    return offline.tokenizer.decode(new)


def test_penalties_equal_their_definition(setup, client):
    offline = setup[1]
    cases = [{"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.8}]
    for case in cases:
        extra = {"repetition_penalty": case.pop("repetition_penalty")} if "repetition_penalty" in case else {}
        answer = client.completions.create(
            model="a0", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True, **extra}, **case
        )
        expected = _greedy_penalized(
            offline,
            "a0",
            PROMPT,
            12,
            frequency=case.get("frequency_penalty", 0.0),
            presence=case.get("presence_penalty", 0.0),
            repetition=extra.get("repetition_penalty", 1.0),
        )
        assert answer.choices[0].text == expected, (case, extra)
    plain = client.completions.create(model="a0", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert plain != expected  # the penalties changed something


def test_bias_top_k_min_p_and_stop_tokens(setup, client):
    offline = setup[1]
    x = offline.ids("x")[0]
    biased = client.completions.create(model="a0", prompt=PROMPT, max_tokens=5, logit_bias={str(x): 100}, seed=3)
    assert biased.choices[0].text == "xxxxx"
    greedy = client.completions.create(model="a1", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = client.completions.create(model="a1", prompt=PROMPT, max_tokens=8, seed=5, extra_body=extra)
        assert sampled.choices[0].text == greedy, extra
    first = offline.ids(greedy[0])[0]
    stopped = client.completions.create(
        model="a1", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"stop_token_ids": [first]}
    )
    assert stopped.choices[0].text == "" and stopped.choices[0].finish_reason == "stop"
    held = client.completions.create(
        model="a1",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"stop_token_ids": [first, EOS], "min_tokens": 3},
    )
    assert held.usage.completion_tokens >= 3 and greedy[0] not in held.choices[0].text[:1]


def test_best_of_returns_the_likeliest_choice(client):
    kw = {"model": "a0", "prompt": PROMPT, "max_tokens": 6, "seed": 11, "temperature": 1.0}
    all_three = client.completions.create(n=3, logprobs=0, extra_body={"ignore_eos": True}, **kw)
    totals = [sum(c.logprobs.token_logprobs) for c in all_three.choices]
    best = client.completions.create(n=1, best_of=3, extra_body={"ignore_eos": True}, **kw)
    assert best.choices[0].text == all_three.choices[totals.index(max(totals))].text
    assert best.choices[0].logprobs is None  # not asked for


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("adapter", ["a0", "a1"])
def test_json_schema_answers_parse_and_validate(client, adapter):
    form = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "a person"}]
    answer = client.chat.completions.create(
        model=adapter, messages=messages, max_tokens=120, n=4, seed=1, response_format=form
    )
    for choice in answer.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_other_constraints_share_a_batch_with_free_rows(client):
    import concurrent.futures
    import re

    def ask(extra):
        return client.completions.create(model="a2", prompt=PROMPT, max_tokens=40, seed=2, extra_body=extra)

    constraints = [
        {"guided_regex": "[a-c]{2,4}-[0-9]+"},
        {"guided_choice": ["yes", "no", "maybe"]},
        {"response_format": {"type": "json_object"}},
        {},
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        regex, choice, obj, free = [a.choices[0].text for a in pool.map(ask, constraints)]
    assert re.fullmatch("[a-c]{2,4}-[0-9]+", regex) or len(regex) >= 5  # cut by max_tokens inside [0-9]+
    assert choice in {"yes", "no", "maybe"}
    assert isinstance(json.loads(obj), dict)
    assert free  # unconstrained


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
]


def test_tools_round_trip(client):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "weather in "}, {"type": "text", "text": "Oslo"}]}
    ]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    answer = client.chat.completions.create(
        model="a0", messages=messages, tools=TOOLS, tool_choice=forced, max_tokens=80, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
    history = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    after = client.chat.completions.create(model="a0", messages=history, tools=TOOLS, max_tokens=5, temperature=0)
    assert after.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    required = client.chat.completions.create(
        model="a1", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0, stream=True
    )
    calls = [c for chunk in required for choice in chunk.choices for c in choice.delta.tool_calls or ()]
    assert len(calls) == 1 and calls[0].function.name in {"get_weather", "noop"}


def test_continuous_usage_in_every_chunk(http):
    body = {
        "model": "a0",
        "prompt": PROMPT,
        "max_tokens": 5,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with http.stream("POST", "/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert all("usage" in c for c in chunks)
    completion = [c["usage"]["completion_tokens"] for c in chunks]
    assert completion == sorted(completion) and completion[-1] == 5


def test_unsupported_fields_are_named(http):
    for body, field in (
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
    ):
        response = http.post("/chat/completions", json={"model": "a0", **body})
        assert response.status_code == 400, response.text
        assert field in response.json()["error"]["message"], response.text


def test_best_of_echo_keeps_each_prompt_with_its_choices(setup, http):
    offline = setup[1]
    prompts = ["abc", "xyz", "pqr"]
    body = {"model": "a0", "prompt": prompts, "echo": True, "logprobs": 1, "best_of": 2, "max_tokens": 3, "seed": 4}
    answer = http.post("/completions", json=body).json()
    for prompt, choice in zip(prompts, answer["choices"]):
        assert choice["text"].startswith(prompt)
        assert "".join(choice["logprobs"]["tokens"][: len(prompt)]) == prompt
        expected = _logprobs(offline, "a0", offline.ids(prompt))
        assert choice["logprobs"]["token_logprobs"][1] == pytest.approx(
            expected[0, offline.ids(prompt)[1]].item(), abs=1e-4
        )


def test_streamed_text_offsets_run_on(http):
    body = {
        "model": "a0",
        "prompt": PROMPT,
        "echo": True,
        "logprobs": 0,
        "max_tokens": 6,
        "ignore_eos": True,
        "temperature": 0,
    }
    whole = http.post("/completions", json=body).json()["choices"][0]["logprobs"]["text_offset"]
    streamed = []
    with http.stream("POST", "/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                logprobs = json.loads(line[6:])["choices"][0]["logprobs"]
                streamed += logprobs["text_offset"] if logprobs else []
    assert streamed == whole and whole == sorted(whole) and whole[-1] > 0


def test_a_grammar_beats_min_tokens(http):
    """min_tokens forbids the end that the grammar alone allows: the grammar wins, nothing fails."""
    body = {"model": "a0", "prompt": PROMPT, "guided_choice": ["a"], "min_tokens": 3, "max_tokens": 5, "temperature": 0}
    for extra in ({}, {"temperature": 1.0, "seed": 1}):
        answer = http.post("/completions", json={**body, **extra})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == "a"


def test_client_input_that_used_to_crash_is_a_400(http):
    deep: dict = {"type": "object"}
    for _ in range(400):
        deep = {"type": "object", "properties": {"x": deep}}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    for path, body, field in (
        ("/completions", {"prompt": "hi", "logit_bias": {"\u00b2": 5}}, "logit_bias"),
        ("/completions", {"prompt": "hi", "logit_bias": {"1": 50, "01": 50}}, "logit_bias"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}, "tools"),
    ):
        response = http.post(
            path, content=json.dumps({"model": "a0", **body}), headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert field in response.json()["error"]["message"] + str(response.json()["error"]["param"])
