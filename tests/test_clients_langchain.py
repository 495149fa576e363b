"""LangChain's ChatOpenAI against `adapterhub serve`, one adapter per model name: structured output
(response_format json_schema, strict, grammar-constrained: the tiny model's random text still makes
an object that validates), forced tool calls whose arguments match the tool's schema, a tool's result
sent back in the history, and plain invoke / stream / batch with token usage."""

from __future__ import annotations

from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field
from serving import Server, make_model_dir, widen_context

pytest.importorskip("langchain_openai")
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI

KEY = "sk-langchain"


class Verdict(BaseModel):
    """A short verdict on the question."""

    ok: bool
    score: int = Field(ge=0, le=9)
    kind: Literal["cat", "dog"]
    note: str = Field(max_length=6)


VERDICT = {  # the same as a JSON schema (with_structured_output then returns a dict)
    "title": "verdict",
    "description": "A short verdict on the question.",
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "kind": {"type": "string", "enum": ["cat", "dog"]},
    },
    "required": ["ok", "score", "kind"],
    "additionalProperties": False,
}


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=10)
    unit: Literal["C", "F"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("langchain")
    dirs = make_model_dir(root)
    widen_context(root / "base")  # a tool prompt is hundreds of characters: tokens, at one a character
    adapters = [a for name in ("a0", "a1") for a in ("--adapter", f"{name}={dirs[name]}")]
    server = Server(
        ["--base", str(root / "base"), "--served-model-name", "tiny", *adapters, "--max-rank", "8", "--api-key", KEY],
        cwd=root,
        timeout=60,
    )
    yield server
    server.stop()


def chat(server, model: str = "a0", **kwargs) -> ChatOpenAI:
    options = {"temperature": 0, "max_tokens": 60, "max_retries": 0, "timeout": 60, **kwargs}
    return ChatOpenAI(base_url=server.url, api_key=KEY, model=model, **options)


@pytest.mark.parametrize("model", ["a0", "a1"])
def test_structured_output_validates(server, model):
    llm = chat(server, model, max_tokens=300)  # the grammar allows 16 blanks between JSON tokens
    verdict = llm.with_structured_output(Verdict, method="json_schema", strict=True).invoke("Is it a cat?")
    assert isinstance(verdict, Verdict)
    Verdict.model_validate(verdict.model_dump())
    raw = llm.with_structured_output(VERDICT, method="json_schema", strict=True, include_raw=True).invoke("Dog?")
    assert raw["parsing_error"] is None, raw
    jsonschema.validate(raw["parsed"], VERDICT)
    assert raw["raw"].usage_metadata["output_tokens"] > 0


def test_forced_tool_call_and_round_trip(server):
    llm = chat(server, "a0", max_tokens=400).bind_tools([GetWeather], tool_choice="GetWeather")
    question = HumanMessage("What is the weather in Oslo?")
    answer = llm.invoke([question])
    assert isinstance(answer, AIMessage) and not answer.invalid_tool_calls, answer
    (call,) = answer.tool_calls
    assert call["name"] == "GetWeather" and call["id"]
    GetWeather.model_validate(call["args"])
    assert answer.response_metadata["finish_reason"] == "tool_calls"
    result = ToolMessage(content=f"sunny, 21 {call['args']['unit']}", tool_call_id=call["id"])
    after = chat(server, "a1", max_tokens=8).bind_tools([GetWeather]).invoke([question, answer, result])
    assert isinstance(after, AIMessage)
    assert after.response_metadata["finish_reason"] in {"stop", "length", "tool_calls"}
    assert after.usage_metadata["input_tokens"] > answer.usage_metadata["input_tokens"]


def test_invoke_stream_batch_with_usage(server):
    llm = chat(server, "a1", max_tokens=12, stream_usage=True)
    whole = llm.invoke("Tell me a story")
    chunks = list(llm.stream("Tell me a story"))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed += chunk
    assert streamed.content == whole.content and whole.content
    usage = whole.usage_metadata
    assert streamed.usage_metadata == usage and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    batch = llm.batch(["Tell me a story", "Hi"])
    assert batch[0].content == whole.content and batch[0].usage_metadata == usage
    assert batch[1].usage_metadata["input_tokens"] < usage["input_tokens"]
