"""adapterhub.serve.tools: the chat prompt with tools (on the tiny ChatML-like template, SmolLM2's, a template that
reads tools itself and one that refuses a system role), the schema that forces a call, the parse of answers, and
the checks of tools and tool_choice."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from tiny_models import tiny_tokenizer
from transformers import AutoTokenizer

from adapterhub.default_model import GGUF_FILE, default_model_dir
from adapterhub.serve.tools import chat_prompt, check_tools, parse_tool_calls, tool_call_schema

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no description, no parameters
TOOLS = [WEATHER, TIME]
NAMED = {"type": "function", "function": {"name": "get_weather"}}

HISTORY = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris and Rome?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24 C"}]},
]

# Qwen2.5-style: reads `tools`, renders calls from `tool_calls` (arguments a dict) and results of the "tool" role.
NATIVE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' and tools %}
{%- elif m.role == 'tool' %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% elif m.tool_calls %}<|im_start|>assistant
{{ m.content }}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Gemma-style: no system role, user and model turns must alternate.
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def with_template(template: str):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def smollm2():
    return AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE)


def test_a_template_that_ignores_tools_gets_them_in_a_system_message():
    question = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    prompt = chat_prompt(tiny_tokenizer(), question, TOOLS, "auto")
    assert prompt.startswith("system: Be brief.\n\nYou can call these functions")  # developer -> system, tools after
    assert json.dumps(WEATHER["function"]) in prompt and '{"name": "get_time"}' in prompt
    assert "<tool_call>" in prompt and prompt.endswith("user: Weather in Paris?\nassistant: ")

    assert (
        chat_prompt(tiny_tokenizer(), question, TOOLS, "none")
        == "system: Be brief.\nuser: Weather in Paris?\nassistant: "
    )
    assert chat_prompt(tiny_tokenizer(), question, None, None) == chat_prompt(tiny_tokenizer(), question, [], "auto")


def test_a_forced_choice_asks_the_fallback_prompt_for_the_bare_call():
    question = [{"role": "user", "content": "Weather in Paris?"}]
    named = chat_prompt(tiny_tokenizer(), question, TOOLS, NAMED)
    assert 'calls "get_weather": {"name": "get_weather", "arguments": <args-json-object>}' in named
    assert "<tool_call>" not in named  # the grammar holds the answer to the bare object
    assert "calls one of them" in chat_prompt(tiny_tokenizer(), question, TOOLS, "required")


def test_a_history_with_calls_and_results_renders_as_text_on_the_tiny_template():
    prompt = chat_prompt(tiny_tokenizer(), HISTORY, TOOLS, "auto")
    calls = (
        'assistant: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
    )
    results = (
        "user: Tool result (call id call_1, function get_weather):\n18 C\n"
        "user: Tool result (call id call_2, function get_weather):\n24 C\nassistant: "
    )
    assert "user: Weather in Paris and Rome?\n" + calls + results in prompt


def test_smollm2_template_ignores_tools_so_they_go_in_its_system_turn(smollm2):
    assert "tools" not in smollm2.chat_template
    prompt = chat_prompt(smollm2, HISTORY[1:], TOOLS, "auto")
    assert prompt.startswith("<|im_start|>system\nYou can call these functions")  # replaces SmolLM's default system
    assert "You are a helpful AI assistant named SmolLM" not in prompt
    assert json.dumps(WEATHER["function"]["parameters"]) in prompt
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<|im_start|>user\nTool result (call id call_2, function get_weather):\n24 C<|im_end|>" in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")

    hidden = chat_prompt(smollm2, HISTORY[1:2], TOOLS, "none")
    assert "get_weather" not in hidden and "You are a helpful AI assistant named SmolLM" in hidden


def test_a_template_that_reads_tools_gets_them_with_calls_and_results_structured():
    tokenizer = with_template(NATIVE)
    prompt = chat_prompt(tokenizer, HISTORY, TOOLS, "auto")
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n" + json.dumps(WEATHER) + "\n")
    assert "You can call these functions" not in prompt  # no fallback text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>' in prompt  # a dict
    assert "<tool_response>18 C</tool_response>" in prompt and "<tool_response>24 C</tool_response>" in prompt

    hidden = chat_prompt(tokenizer, HISTORY, TOOLS, "none")
    assert "# Tools" not in hidden and "<|im_start|>system\nBe brief.<|im_end|>" in hidden
    assert "<tool_response>24 C</tool_response>" in hidden  # the history still renders


def test_a_template_without_a_system_role_gets_it_folded_into_the_first_user_turn():
    prompt = chat_prompt(with_template(NO_SYSTEM), HISTORY, TOOLS, "auto")
    assert prompt.startswith("<start_of_turn>user\nBe brief.\n\nYou can call these functions")
    assert "</tools>" in prompt and "Weather in Paris and Rome?<end_of_turn>" in prompt
    results = (
        "<start_of_turn>user\nTool result (call id call_1, function get_weather):\n18 C\n\nTool result (call id call_2"
    )
    assert results in prompt  # merged into one turn, so turns alternate


def test_messages_the_template_refuses_and_bad_history_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"^messages: the model's chat template refuses them: no$"):
        chat_prompt(with_template("{{ raise_exception('no') }}"), HISTORY[1:2], TOOLS, "auto")
    history = [
        dict(HISTORY[2], tool_calls=[{**HISTORY[2]["tool_calls"][0], "function": {"name": "x", "arguments": "[1]"}}])
    ]
    with pytest.raises(ValueError, match=r"^messages\[0\]\.tool_calls\[0\]\.function\.arguments: not a JSON object"):
        chat_prompt(tiny_tokenizer(), history, TOOLS, "auto")


def test_no_schema_unless_the_choice_forces_a_call():
    for choice in ("auto", "none", None):
        assert tool_call_schema(TOOLS, choice) is None


def test_the_named_schema_accepts_exactly_a_call_of_that_tool():
    schema = tool_call_schema(TOOLS, NAMED)
    jsonschema.Draft202012Validator.check_schema(schema)
    valid = jsonschema.Draft202012Validator(schema)
    assert valid.is_valid({"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}})
    for wrong in (
        {"name": "get_time", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {}},  # city required
        {"name": "get_weather", "arguments": {"city": 3}},
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "K"}},
        {"name": "get_weather"},
        {"name": "get_weather", "arguments": {"city": "Paris"}, "extra": 1},
        [{"name": "get_weather", "arguments": {"city": "Paris"}}],  # one call, not a list
    ):
        assert not valid.is_valid(wrong), wrong


def test_the_required_schema_accepts_a_call_of_any_tool():
    valid = jsonschema.Draft202012Validator(tool_call_schema(TOOLS, "required"))
    assert valid.is_valid({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert valid.is_valid({"name": "get_time", "arguments": {"zone": "UTC"}})  # no parameters: any object
    assert not valid.is_valid({"name": "get_time", "arguments": "UTC"})
    assert not valid.is_valid({"name": "get_date", "arguments": {}})
    assert tool_call_schema([WEATHER], "required") == tool_call_schema(TOOLS, NAMED)  # one tool: no anyOf


def test_refs_in_parameters_still_resolve_where_the_schema_puts_them():
    parameters = {
        "type": "object",
        "properties": {"spot": {"$ref": "#/$defs/Spot"}, "tag": {"const": {"$ref": "#/kept"}}},
        "$defs": {"Spot": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]}},
    }
    tools = [WEATHER, {"type": "function", "function": {"name": "locate", "parameters": parameters}}]
    call = {"name": "locate", "arguments": {"spot": {"lat": 1.5}, "tag": {"$ref": "#/kept"}}}
    for choice in ("required", {"type": "function", "function": {"name": "locate"}}):
        valid = jsonschema.Draft202012Validator(tool_call_schema(tools, choice))
        assert valid.is_valid(call)
        assert not valid.is_valid({"name": "locate", "arguments": {"spot": {"lat": "north"}}})


ID = re.compile(r"call_[0-9a-f]{24}")


def assert_calls(calls: list[dict], expected: list[tuple[str, dict]]) -> None:
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", name, arguments) for name, arguments in expected
    ]
    assert all(ID.fullmatch(c["id"]) for c in calls) and len({c["id"] for c in calls}) == len(calls)


def test_a_forced_answer_is_one_call_or_content_when_cut_off():
    content, calls = parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Paris"}}', TOOLS, forced=True)
    assert content is None and calls[0]["function"]["arguments"] == '{"city":"Paris"}'  # compact
    assert_calls(calls, [("get_weather", {"city": "Paris"})])
    assert parse_tool_calls('{"name": "get_weather", "argu', TOOLS, forced=True) == (
        '{"name": "get_weather", "argu',
        [],
    )


def test_hermes_blocks_are_calls_and_the_rest_is_content():
    text = (
        "Let me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}</tool_call>\n'
        '<tool_call>{"name": "get_time"}</tool_call>'
    )
    content, calls = parse_tool_calls(text, TOOLS, forced=False)
    assert content == "Let me check both."
    assert_calls(
        calls, [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "unit": "C"}), ("get_time", {})]
    )

    content, calls = parse_tool_calls(
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}', TOOLS, False
    )
    assert content is None  # an unclosed last block (cut by a stop), arguments quoted as JSON text
    assert_calls(calls, [("get_time", {"zone": "UTC"})])


def test_unknown_tools_and_malformed_blocks_stay_content():
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    malformed = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>'
    good = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(f"{unknown}\n{malformed}\n{good}", TOOLS, forced=False)
    assert content == f"{unknown}\n{malformed}"
    assert_calls(calls, [("get_time", {})])
    assert parse_tool_calls(unknown, TOOLS, forced=False) == (unknown, [])
    assert parse_tool_calls(good, None, forced=False) == (good, [])  # tool_choice "none": nothing is a call


def test_a_bare_call_object_is_a_call_but_other_json_or_prose_is_content():
    content, calls = parse_tool_calls(' {"name": "get_weather", "arguments": {"city": "Oslo"}}\n', TOOLS, forced=False)
    assert content is None
    assert_calls(calls, [("get_weather", {"city": "Oslo"})])
    _, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}', TOOLS, forced=False)
    assert_calls(calls, [("get_weather", {"city": "Oslo"})])  # Llama 3's key
    for text in (
        '{"name": "get_weather", "arguments": {"city": "Oslo"}, "why": "asked"}',
        '{"name": "Ada", "arguments": {}}',
        '{"name": "get_weather", "arguments": [1]}',
        "The weather is fine.",
        "",
    ):
        assert parse_tool_calls(text, TOOLS, forced=False) == (text, [])


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        (TOOLS, {"type": "function", "function": {"name": "x"}}, "tool_choice.function.name: no tool named 'x'"),
        (None, NAMED, "tool_choice.function.name: no tool named 'get_weather'"),
        (None, "required", "tool_choice: 'required' needs tools"),
        (TOOLS, "sometimes", "tool_choice: 'sometimes' is not"),
        ([WEATHER, TIME, WEATHER], "auto", "tools[2].function.name: 'get_weather' is declared twice"),
        ([{"type": "function", "function": {"name": "get weather"}}], "auto", "tools[0].function.name: 'get weather'"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
            "auto",
            "tools[0].function.parameters.type: not a JSON schema",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": 12}}}}}],
            "auto",
            "tools[0].function.parameters.properties.a.type: not a JSON schema",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            "auto",
            "tools[0].function.parameters.type: must be 'object'",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": ["city"]}}],
            "auto",
            "tools[0].function.parameters: must be a JSON schema object",
        ),
    ],
)
def test_check_tools_names_the_field(tools, choice, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        check_tools(tools, choice)


def test_check_tools_accepts_what_the_other_functions_honour():
    for tools, choice in ((None, None), ([], "auto"), (None, "none"), (TOOLS, "required"), (TOOLS, NAMED)):
        check_tools(tools, choice)
