"""OpenAI's request bodies for /v1/completions and /v1/chat/completions, as the server accepts them.

Fields the server cannot honour are refused (400 naming the field) rather than ignored, so that a
client never silently gets something other than it asked for. Types are strict, as the OpenAPI
document says (no "1" for 1, no 0 for false). `ignore_eos` is vLLM's extension.
Every value that could fail later, on the engine thread, is refused here instead: temperatures that
vanish in fp32, seeds outside a generator's range, text that is not Unicode (a lone surrogate), and
requests too big to be fair to other tenants (prompts per request, stop strings).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .compositions import CompositionSpec, MergedAdapters
from .fields import Text
from .sampling import Sampling

MAX_STOPS = 4
MAX_STOP_TOKENS = 64  # stop_token_ids
MAX_LOGIT_BIAS = 300  # tokens in logit_bias (OpenAI's bound)
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
MAX_PATTERN_CHARS = 16384  # guided_regex
MAX_CHOICES = 256  # guided_choice
MAX_TOOLS = 128
MAX_STOP_CHARS = 256  # each stop string's length: held-back text is checked against each at every token
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MIN_TEMPERATURE = 1e-4  # below this (but 0, greedy) logits / temperature overflow or the temperature is 0 in fp32
SEED_RANGE = (-(2**63), 2**64 - 1)  # torch.Generator.manual_seed's


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far in every chunk


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object) or json_schema."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self


class _Generation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[Text, Text] | None = Field(None, max_length=16)  # tags for stored completions: none are stored
    store: bool = False
    # vLLM's extensions
    ignore_eos: bool = False
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    top_k: int = Field(0, ge=-1, le=2**31 - 1)  # -1 or 0: every token
    min_p: float = Field(0.0, ge=0, le=1)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKENS)
    guided_json: dict | Text | None = None
    guided_regex: Text | None = Field(None, max_length=MAX_PATTERN_CHARS)
    guided_choice: list[Text] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    # LoRAX's: the adapter by id (instead of `model`), loaded just in time from `adapter_source`
    adapter_id: Text | None = Field(None, min_length=1, max_length=256)
    adapter_source: Text | None = None
    # adapters combined for this request (on the base model): ours, and LoRAX's form
    composition: CompositionSpec | None = None
    merged_adapters: MergedAdapters | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"use 0 for greedy decoding, or at least {MIN_TEMPERATURE:g} (smaller overflows)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias):
        if bias is None:
            return bias
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"holds {len(bias)} tokens; at most {MAX_LOGIT_BIAS}")
        seen: set[int] = set()
        for token, value in bias.items():
            if not (token.isascii() and token.isdigit()) or len(token) > 9:
                raise ValueError(f"key {token!r} is not a token id (a string of digits, as OpenAI's API has them)")
            if int(token) in seen:
                raise ValueError(f"key {token!r} names token {int(token)} again; give each token once")
            seen.add(int(token))
            if not -100 <= value <= 100:
                raise ValueError(f"token {token}: the bias {value} is outside [-100, 100]")
        return bias

    @field_validator("store")
    @classmethod
    def _no_store(cls, store):
        if store:
            raise ValueError("this server does not store completions; leave store false")
        return store

    @model_validator(mode="after")
    def _one_constraint(self):
        named = [f for f in ("guided_json", "guided_regex", "guided_choice") if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            named.append("response_format")
        if len(named) > 1:
            raise ValueError(f"{' and '.join(named)} each constrain the output; send one of them")
        return self

    def constraint(self) -> tuple[str, tuple[str, str | tuple[str, ...] | None]] | None:
        """(the field that asks it, (grammar kind, value)) for the output to match (grammar.Constraint's
        fields), or None."""
        if self.guided_json is not None:
            schema = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            return "guided_json", ("json_schema", schema)
        if self.guided_regex is not None:
            return "guided_regex", ("regex", self.guided_regex)
        if self.guided_choice is not None:
            return "guided_choice", ("choice", tuple(self.guided_choice))
        form = self.response_format
        if form is None or form.type == "text":
            return None
        if form.type == "json_object" or form.json_schema.schema_ is None:
            return "response_format", ("json_object", None)
        return "response_format", ("json_schema", json.dumps(form.json_schema.schema_))

    def sampling(self, max_tokens: int, *, n: int | None = None, logprobs: int | None = None) -> Sampling:
        """The engine's parameters; `n`: rows to generate (best_of), `logprobs`: alternatives per token."""
        return Sampling(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            n=n or self.n,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=tuple((int(t), b) for t, b in (self.logit_bias or {}).items()),
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logprobs=logprobs,
        )

    @property
    def usage_every_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_Generation):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 8}]},
    )
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=2**31 - 1)  # 0: the prompt only (with echo and logprobs: scored)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=64)
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, prompt):
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"holds {len(prompt)} prompts; send at most {MAX_PROMPTS} per request")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix):
        if suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported: the served models have no infill format")
        return suffix

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.stream and (self.best_of or self.n) > self.n:
            raise ValueError("best_of greater than n cannot be streamed (the best are known only at the end)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ValueError("prompt is empty")
        return list(p)

    def request_sampling(self, max_tokens: int) -> Sampling:
        """The engine's parameters: best_of rows (their logprobs kept to rank them), and the prompt's
        logprobs for echo with logprobs."""
        rows = self.best_of or self.n
        logprobs = self.logprobs if self.logprobs is not None or rows == self.n else 0
        prompt_logprobs = self.logprobs if self.echo else None
        return replace(self.sampling(max_tokens, n=rows, logprobs=logprobs), prompt_logprobs=prompt_logprobs)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: Text | None = None  # tool

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def wire(self) -> dict:
        """The message as OpenAI's wire format has it (what tools.chat_prompt takes), content parts kept."""
        return self.model_dump(exclude_none=True, by_alias=True)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Text = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Text | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Text


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Generation):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
            ]
        },
    )
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs true")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def tool_dicts(self) -> tuple[list[dict] | None, str | dict | None]:
        """(tools, tool_choice) in OpenAI's wire shape, for tools.py."""
        tools = None if self.tools is None else [t.model_dump(exclude_none=True) for t in self.tools]
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        return tools, choice


class AdapterUpload(BaseModel):
    """POST /v1/adapters: load (or replace) an adapter under `name` from `source`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Text = Field(min_length=1, max_length=256, pattern=r"^[^#@/\s\x00]+$")
    source: Text = Field(min_length=1, max_length=1024)
    revision: Text | None = Field(None, max_length=256)
