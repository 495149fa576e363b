"""The answers of /v1/completions and /v1/chat/completions in OpenAI's shapes, whole or streamed as
server-sent events, from a backend's generation events (backend.generate).

What a choice carries: its text (after the prompt's, with `echo`); logprobs (completions: tokens,
token_logprobs, top_logprobs, text_offset; chat: content entries with bytes and top_logprobs), the
chosen token always among the alternatives as vLLM has it; tool calls parsed from the text when the
request gave tools (tools.py), with finish_reason "tool_calls". A streamed chat answer that may hold
tool calls is sent whole at its end, as the calls can only be parsed then. Usage comes in the whole
answer, in a last chunk (`stream_options.include_usage`), or in every chunk so far
(`continuous_usage_stats` with `include_usage`, as vLLM).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..backbone import Composition
from . import tools
from .api import ChatRequest, CompletionRequest
from .backend import Scored, Start
from .engine import Finished, PromptLogprobs, Token
from .errors import ApiError
from .openapi import error_body

REPLICA_HEADER = "x-adapterhub-replica"
log = logging.getLogger("adapterhub.serve")


@dataclass
class _Choice:
    """One choice as it comes in."""

    text: str = ""
    logprobs: list[Scored] = field(default_factory=list)
    reason: str | None = None
    tokens: int = 0  # generated so far


class _Answer:
    """What a request's choices hold so far, and how each endpoint shows it."""

    def __init__(self, body: CompletionRequest | ChatRequest, start: Start, chat: bool):
        self.body, self.start, self.chat = body, start, chat
        self.choices: dict[int, _Choice] = {}
        self.prompt_logprobs: dict[int, list[Scored]] = {}  # prompt index -> its tokens' entries
        self.tool_list = body.tool_dicts()[0] if chat and start.tools else None
        self.head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body.model,
        }

    def add(self, index: int, event) -> _Choice:
        choice = self.choices.setdefault(index, _Choice())
        if isinstance(event, PromptLogprobs):
            self.prompt_logprobs[index // self.body.n] = list(event.entries)
        elif isinstance(event, Token):
            choice.text += event.text
            choice.logprobs += event.logprobs
            choice.tokens = max(choice.tokens, event.count)
        elif isinstance(event, Finished):
            choice.logprobs += event.logprobs
            choice.reason, choice.tokens = event.reason, event.tokens
        return choice

    def usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices.values())
        prompt = self.start.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @property
    def wants_logprobs(self) -> bool:
        return self.body.logprobs if self.chat else self.body.logprobs is not None

    @property
    def echo(self) -> bool:
        return not self.chat and self.body.echo

    def echoed(self, index: int) -> tuple[str, list[Scored]]:
        """(prompt text, its logprob entries) that choice `index` begins with under echo."""
        k = index // self.body.n
        return self.start.prompt_texts[k], self.prompt_logprobs.get(k, [])

    def whole(self) -> dict:
        return {
            **self.head,
            "object": "chat.completion" if self.chat else "text_completion",
            "choices": [self._whole_choice(i, c) for i, c in sorted(self.choices.items())],
            "usage": self.usage(),
        }

    def _whole_choice(self, index: int, choice: _Choice) -> dict:
        if not self.chat:
            text, entries = choice.text, choice.logprobs
            if self.echo:
                prompt, prompt_entries = self.echoed(index)
                text, entries = prompt + text, prompt_entries + entries
            logprobs = completion_logprobs(entries) if self.wants_logprobs else None
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.reason}
        message, reason = self.message(choice)
        logprobs = chat_logprobs(choice.logprobs) if self.wants_logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def message(self, choice: _Choice) -> tuple[dict, str | None]:
        """The assistant message of a finished chat choice, and its finish reason."""
        if self.tool_list is None:
            return {"role": "assistant", "content": choice.text}, choice.reason
        content, calls = tools.parse_tool_calls(choice.text, self.tool_list, self.start.forced)
        if not calls:
            return {"role": "assistant", "content": content}, choice.reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def completion_logprobs(entries: list[Scored], at: int = 0) -> dict:
    """OpenAI's legacy completions logprobs: parallel lists, offsets into the choice's text (`at`: where
    the first entry's text begins, for a stream's later chunks)."""
    offsets = []
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else _top_map(e) for e in entries],
        "text_offset": offsets,
    }


def _top_map(entry: Scored) -> dict[str, float]:
    top = {text: logprob for text, logprob, _ in entry.top}
    top.setdefault(entry.token, entry.logprob)
    return top


def chat_logprobs(entries: list[Scored]) -> dict:
    """OpenAI's chat logprobs: one entry per token, with bytes and its top alternatives."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.bytes),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


async def respond(
    backend,
    body: CompletionRequest | ChatRequest,
    request: Request,
    tenant: str,
    *,
    chat: bool,
    composition: Composition | None = None,
):
    """The response to a generation request: whole JSON, or a stream of server-sent events. With
    `composition`, the body's adapters combined on the base model."""
    adapter = composition or (None if body.model == backend.base_name else body.model)
    events = backend.generate(adapter, body, tenant)
    start = await anext(events)  # errors before the first token (unknown model, too long) are plain JSON errors
    headers = {REPLICA_HEADER: start.replica}
    answer = _Answer(body, start, chat)
    if body.stream:
        return StreamingResponse(_sse(events, answer), headers=headers, media_type="text/event-stream")
    await _collect(events, request, answer)
    return JSONResponse(answer.whole(), headers=headers)


async def _collect(events, request: Request, answer: _Answer) -> None:
    """Takes in every event of a whole response; the generation is cancelled (its rows leave the
    batch) if the client disconnects first."""

    async def consume():
        async for index, event in events:
            answer.add(index, event)

    async def gone():  # the body is read: the next message the client's channel gives is its disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    generation, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({generation, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not generation.done():  # the client went away (or this task was cancelled): stop generating
            generation.cancel()
            await asyncio.gather(generation, return_exceptions=True)
    if generation.cancelled():
        raise ApiError(499, "the client disconnected before the response was complete; generation stopped")
    generation.result()  # a failure's ApiError


async def _sse(events, answer: _Answer):
    body, chat = answer.body, answer.chat
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    every = include_usage and body.usage_every_chunk  # vLLM's: continuous usage needs include_usage
    buffered = answer.tool_list is not None  # tool calls are parsed from the whole text

    def chunk(choices: list, **extra) -> str:
        usage = {"usage": answer.usage()} if every and "usage" not in extra else {}
        return f"data: {json.dumps({**answer.head, 'object': obj, 'choices': choices, **usage, **extra})}\n\n"

    def piece(index: int, text: str, entries: list[Scored], reason: str | None = None, **delta) -> dict:
        if chat:
            logprobs = chat_logprobs(entries) if answer.wants_logprobs else None
            return {
                "index": index,
                "delta": {**({"content": text} if text else {}), **delta},
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        logprobs = completion_logprobs(entries, sent.get(index, 0)) if answer.wants_logprobs else None
        sent[index] = sent.get(index, 0) + sum(len(e.token) for e in entries)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    sent: dict[int, int] = {}  # choice -> characters of its tokens' texts sent (text_offset of the next)
    try:
        if chat:
            first = {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield chunk([{"index": i, **first} for i in range(body.n)])
        started: set[int] = set()
        async for index, event in events:
            choice = answer.add(index, event)
            if isinstance(event, PromptLogprobs):
                continue
            if answer.echo and index not in started:
                started.add(index)
                text, entries = answer.echoed(index)
                yield chunk([piece(index, text, entries)])
            if buffered:
                if isinstance(event, Finished):
                    message, reason = answer.message(choice)
                    calls = [dict(call, index=j) for j, call in enumerate(message.get("tool_calls", []))]
                    delta = {"tool_calls": calls} if calls else {}
                    yield chunk([piece(index, message["content"] or "", choice.logprobs, reason, **delta)])
            elif isinstance(event, Token) and (event.text or event.logprobs):
                yield chunk([piece(index, event.text, list(event.logprobs))])
            elif isinstance(event, Finished):
                yield chunk([piece(index, "", list(event.logprobs), event.reason)])
        if include_usage:
            yield chunk([], usage=answer.usage())
    except ApiError as error:  # the stream has started: the error is its last event
        yield f"data: {json.dumps(error_body(error.status, str(error)))}\n\n"
    except Exception as error:  # a bug: still the stream's last event, in OpenAI's shape
        log.exception("a stream failed")
        yield f"data: {json.dumps(error_body(500, f'the server failed on this request ({type(error).__name__})'))}\n\n"
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"
