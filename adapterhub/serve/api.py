"""OpenAI's request bodies for /v1/completions and /v1/chat/completions, as the server accepts them.

Fields the server cannot honour are refused (400 naming the field) rather than ignored, so that a
client never silently gets something other than it asked for. Types are strict, as the OpenAPI
document says (no "1" for 1, no 0 for false). `ignore_eos` is vLLM's extension.
Every value that could fail later, on the engine thread, is refused here instead: temperatures that
vanish in fp32, seeds outside a generator's range, text that is not Unicode (a lone surrogate), and
requests too big to be fair to other tenants (prompts per request, stop strings).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .sampling import Sampling

MAX_STOPS = 4
MAX_STOP_CHARS = 256  # each stop string's length: held-back text is checked against each at every token
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MIN_TEMPERATURE = 1e-4  # below this (but 0, greedy) logits / temperature overflow or the temperature is 0 in fp32
SEED_RANGE = (-(2**63), 2**64 - 1)  # torch.Generator.manual_seed's


def _unicode(text: str) -> str:
    """Refuses text that cannot be encoded (a lone surrogate, which JSON's \\ud800 escapes allow)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"holds a lone surrogate at character {error.start}; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False

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

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0:
            raise ValueError("penalties are not supported by this server; leave them at 0")
        return value

    def sampling(self, max_tokens: int) -> Sampling:
        return Sampling(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            n=self.n,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Generation):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 8}]},
    )
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: None = None
    best_of: int | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, prompt):
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"holds {len(prompt)} prompts; send at most {MAX_PROMPTS} per request")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo):
        if echo:
            raise ValueError("echo is not supported by this server; leave it false")
        return echo

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ValueError("prompt is empty")
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


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

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs):
        if logprobs:
            raise ValueError("logprobs are not supported by this server; leave it false")
        return logprobs

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AdapterUpload(BaseModel):
    """POST /v1/adapters: load (or replace) an adapter under `name` from `source`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Text = Field(min_length=1, max_length=256, pattern=r"^[^#@/\s\x00]+$")
    source: Text = Field(min_length=1, max_length=1024)
    revision: Text | None = Field(None, max_length=256)
