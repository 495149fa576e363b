"""OpenAI tool calling on top of a model's chat template: the prompt, the schema that forces a call, and the parse.

Pure functions over OpenAI's wire shapes (plain dicts, already validated by the API models), for the chat endpoint:

- `check_tools` refuses tool lists and tool_choice values that cannot be honoured, naming the field (a 400).
- `chat_prompt` renders messages, and the tools unless tool_choice is "none", with the tokenizer's chat template.
  A template that reads the `tools` variable gets them the way transformers documents; one that does not (it would
  silently drop them) gets a system message that lists them and asks for Hermes/Qwen-style answers,
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Earlier calls and tool results are passed as
  `tool_calls` / role "tool" to templates that read those, and otherwise written as text in the same format.
- `tool_call_schema` is the JSON schema a forced answer (tool_choice "required" or a named function) must match; the
  grammar module constrains generation to it. It is ONE call: `parallel_tool_calls` cannot make a forced answer hold
  several, which keeps the grammar a single object (OpenAI allows one call there too).
- `parse_tool_calls` turns a generated answer into (content, tool_calls).
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from typing import Any

import jinja2
import jinja2.nodes
import jsonschema

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
CALL_FORMAT = '{"name": <function-name>, "arguments": <args-json-object>}'  # as Qwen's template says
CHOICES = (None, "none", "auto", "required")  # tool_choice's strings (None: not given, which acts as "auto")
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")  # transformers' own tag, unknown to plain Jinja
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)  # the last block may be cut off unclosed
_INSTANCE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their values are data, not schemas
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def check_tools(tools: list[dict] | None, tool_choice: str | dict | None) -> None:
    """Raises ValueError, its message starting with the field, for what the other functions cannot honour:
    a function name outside OpenAI's rule or declared twice, `parameters` that is not a JSON schema of an object
    (arguments are a JSON object), a tool_choice that is not one of OpenAI's, names an undeclared tool, or forces
    a call ("required" or named) without tools."""
    names: list[str] = []
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}].function"
        function = tool["function"]
        name = function["name"]
        if not NAME.fullmatch(name):
            raise ValueError(f"{where}.name: {name!r} is not 1 to 64 letters, digits, '_' or '-'")
        if name in names:
            raise ValueError(f"{where}.name: {name!r} is declared twice")
        names.append(name)
        if function.get("parameters") is not None:
            _check_parameters(function["parameters"], f"{where}.parameters")
    if isinstance(tool_choice, dict):
        chosen = tool_choice["function"]["name"]
        if chosen not in names:
            raise ValueError(f"tool_choice.function.name: no tool named {chosen!r}")
    elif tool_choice not in CHOICES:
        raise ValueError(f"tool_choice: {tool_choice!r} is not 'none', 'auto', 'required' or a named function")
    elif tool_choice == "required" and not names:
        raise ValueError("tool_choice: 'required' needs tools")


def _check_parameters(parameters: Any, where: str) -> None:
    """Refuses `parameters` that jsonschema's metaschema (of the schema's $schema, else the latest draft) rejects,
    or whose type is not "object"."""
    if not isinstance(parameters, dict):
        raise ValueError(f"{where}: must be a JSON schema object")
    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.SchemaError as error:
        raise ValueError(f"{where}{error.json_path[1:]}: not a JSON schema: {error.message}") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to check; flatten the schema") from None
    if parameters.get("type", "object") != "object":
        raise ValueError(f"{where}.type: must be 'object' (a call's arguments are a JSON object)")


def chat_prompt(tokenizer, messages: list[dict], tools: list[dict] | None, tool_choice: str | dict | None) -> str:
    """The prompt text for a chat request: `messages` (and `tools`, hidden when tool_choice is "none") rendered with
    the tokenizer's chat template, ending with the assistant's generation prompt. See the module docstring.

    Raises ValueError naming the field for an assistant call whose arguments are not a JSON object, or for messages
    the template refuses even after systems are folded into user turns (templates without a system role, or that
    want user and assistant to alternate, raise on them)."""
    shown = tools if tools and tool_choice != "none" else None
    variables, mentions = _template_words(tokenizer.get_chat_template(None, shown))
    chat = _chat(messages, mentions)
    if shown and "tools" not in variables:
        chat = _with_system(chat, _tools_text(shown, tool_choice))
        shown = None
    for attempt in (chat, _folded(chat)):
        try:
            return tokenizer.apply_chat_template(attempt, tools=shown, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as error:
            refusal = error
    raise ValueError(f"messages: the model's chat template refuses them: {refusal}")


@functools.lru_cache(maxsize=16)
def _template_words(template: str) -> tuple[frozenset[str], frozenset[str]]:
    """(variable names, attribute names and string constants) of a chat template. A template that never names the
    `tools` variable ignores the tools it is given; one that never mentions "tool_calls" or the "tool" role drops
    (or garbles) calls and results passed in OpenAI's structure, so those are written as text instead."""
    ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(_GENERATION_TAG.sub("", template))
    variables = frozenset(node.name for node in ast.find_all(jinja2.nodes.Name))
    attributes = {node.attr for node in ast.find_all(jinja2.nodes.Getattr)}
    constants = {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return variables, frozenset(attributes | constants)


def _chat(messages: list[dict], mentions: frozenset[str]) -> list[dict]:
    """Messages as the template takes them: string content; "developer" as "system" unless the template knows it;
    assistant calls as transformers documents them (arguments a dict) or as <tool_call> text; tool results as role
    "tool" (with the called function's name when an earlier call has that id) or as user text naming the call."""
    chat: list[dict] = []
    called: dict[str, str] = {}  # tool call id -> function name
    for i, message in enumerate(messages):
        role, text = message["role"], _text(message.get("content"))
        if role == "developer" and "developer" not in mentions:
            role = "system"
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                (call["id"], call["function"]["name"], _arguments(call, f"messages[{i}].tool_calls[{j}]"))
                for j, call in enumerate(message["tool_calls"])
            ]
            called.update((call_id, name) for call_id, name, _ in calls)
            if "tool_calls" in mentions:
                structured = [
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
                    for call_id, name, arguments in calls
                ]
                chat.append({"role": "assistant", "content": text, "tool_calls": structured})
            else:
                blocks = [_hermes_block(name, arguments) for _, name, arguments in calls]
                chat.append({"role": "assistant", "content": "\n".join([text, *blocks] if text else blocks)})
        elif role == "tool":
            call_id = message["tool_call_id"]
            name = called.get(call_id)
            if "tool" in mentions:
                chat.append(
                    {"role": "tool", "content": text, "tool_call_id": call_id} | ({"name": name} if name else {})
                )
            else:
                about = f"call id {call_id}, function {name}" if name else f"call id {call_id}"
                chat.append({"role": "user", "content": f"Tool result ({about}):\n{text}"})
        else:
            chat.append({"role": role, "content": text})
    return chat


def _text(content: str | list[dict] | None) -> str:
    """A message's content as one string: text parts joined (as the API's ChatMessage.text does), None as ""."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def _arguments(call: dict, where: str) -> dict:
    """An earlier call's arguments (JSON text on the wire) as the dict templates expect."""
    try:
        arguments = json.loads(call["function"]["arguments"])
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments: not a JSON object")
    return arguments


def _hermes_block(name: str, arguments: dict) -> str:
    """One call in the format the fallback system message asks for, so the history shows the model its own style."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


def _tools_text(tools: list[dict], tool_choice: str | dict | None) -> str:
    """The fallback system text: each function (name, description, parameters) as a JSON line, then the answer
    format. A forced choice asks for the bare JSON object the grammar will hold the answer to."""
    functions = (tool["function"] for tool in tools)
    listing = "\n".join(
        json.dumps({key: f[key] for key in ("name", "description", "parameters") if key in f}, ensure_ascii=False)
        for f in functions
    )
    head = f"You can call these functions (tools), given as JSON schemas:\n<tools>\n{listing}\n</tools>\n"
    if tool_choice == "required":
        return f"{head}Answer with only a JSON object that calls one of them: {CALL_FORMAT}"
    if isinstance(tool_choice, dict):
        name = json.dumps(tool_choice["function"]["name"])
        return f"{head}Answer with only a JSON object that calls {name}: {CALL_FORMAT.replace('<function-name>', name)}"
    return (
        f"{head}To call functions, answer with one block per call:\n<tool_call>\n{CALL_FORMAT}\n</tool_call>\n"
        "Otherwise answer normally."
    )


def _with_system(chat: list[dict], text: str) -> list[dict]:
    """`chat` with `text` appended to its leading system message, or in a new one put first."""
    if chat and chat[0]["role"] == "system":
        first = chat[0]["content"]
        return [{"role": "system", "content": f"{first}\n\n{text}" if first else text}, *chat[1:]]
    return [{"role": "system", "content": text}, *chat]


def _folded(chat: list[dict]) -> list[dict]:
    """`chat` for templates that refuse a system role or consecutive user turns: systems become user turns, and
    adjacent user turns (a system and the first question, several tool results) are merged into one."""
    folded: list[dict] = []
    for message in chat:
        message = message | {"role": "user"} if message["role"] == "system" else message
        if folded and message["role"] == "user" == folded[-1]["role"]:
            folded[-1] = {"role": "user", "content": f"{folded[-1]['content']}\n\n{message['content']}"}
        else:
            folded.append(message)
    return folded


def tool_call_schema(tools: list[dict], tool_choice: str | dict | None) -> dict | None:
    """The JSON schema a forced answer must match to be one call, or None when the answer is free ("auto", "none",
    not given). Named function X: {"name": const X, "arguments": X's parameters}; "required": the same for each tool,
    under anyOf when there are several. Missing parameters allow any object. `$ref`s inside a tool's parameters are
    rebased onto where the parameters now sit, so `#/$defs/...` still resolves."""
    if tool_choice != "required" and not isinstance(tool_choice, dict):
        return None
    functions = [
        tool["function"]
        for tool in tools
        if tool_choice == "required" or tool["function"]["name"] == tool_choice["function"]["name"]
    ]
    if len(functions) == 1:
        return _call_schema(functions[0], "#")
    return {"anyOf": [_call_schema(function, f"#/anyOf/{i}") for i, function in enumerate(functions)]}


def _call_schema(function: dict, at: str) -> dict:
    """The schema of one call of `function`, placed at JSON pointer `at` of the whole schema."""
    parameters = {k: v for k, v in (function.get("parameters") or {}).items() if k not in ("$schema", "$id")}
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": {"type": "object", **_rebase(parameters, f"{at}/properties/arguments")},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _rebase(schema: Any, prefix: str) -> Any:
    """`schema` with each local `$ref` ("#...") moved under `prefix`; instance values (const, enum...) untouched."""
    if isinstance(schema, list):
        return [_rebase(item, prefix) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rebased = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            rebased[key] = prefix + value[1:]
        elif key in _INSTANCE_KEYWORDS:
            rebased[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            rebased[key] = {name: _rebase(sub, prefix) for name, sub in value.items()}
        else:
            rebased[key] = _rebase(value, prefix)
    return rebased


def parse_tool_calls(text: str, tools: list[dict] | None, forced: bool) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a generated answer; `tools` are those shown to the model (none when tool_choice was
    "none": then nothing is a call). Content is None when the answer is only calls, and `text` unchanged when it
    holds none.

    forced (generation was held to `tool_call_schema`): the whole text is the call's JSON object; text that does
    not parse (cut off by max_tokens) stays content. Otherwise: each <tool_call>...</tool_call> block (the last
    may be unclosed, cut off by a stop) that holds a call of a declared tool is taken out of the content; blocks
    naming unknown tools or holding malformed JSON stay in it. When no block is a call, a whole answer that is exactly
    {"name": <declared tool>, "arguments": {...}} is a call too (what small models and Llama-style templates emit;
    "parameters" is taken for "arguments"): a declared name and nothing else in the object is unlikely prose."""
    names = {tool["function"]["name"] for tool in tools or []}
    if forced:
        call = _call(_json(text), names)
        return (None, [call]) if call else (text, [])
    calls, kept, start = [], [], 0
    for block in _TOOL_CALL.finditer(text):
        call = _call(_json(block.group(1)), names)
        if call:
            calls.append(call)
            kept.append(text[start : block.start()])
            start = block.end()
    if not calls:
        bare = _json(text)
        if isinstance(bare, dict) and set(bare) in ({"name", "arguments"}, {"name", "parameters"}):
            call = _call(bare, names)
            return (None, [call]) if call else (text, [])
        return text, []
    content = "".join([*kept, text[start:]]).strip()
    return content or None, calls


def _json(text: str) -> Any:
    """The JSON value of `text`, or None when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(value: Any, names: set[str]) -> dict | None:
    """The OpenAI tool call (a fresh id, compact JSON arguments) that a decoded {"name": ..., "arguments": ...}
    stands for, or None when it is not a call of a declared function. Missing arguments are {}; arguments given
    as JSON text holding an object are taken (some models quote them)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json(arguments)
    if not isinstance(arguments, dict):
        return None
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {
            "name": value["name"],
            "arguments": json.dumps(arguments, ensure_ascii=False, separators=(",", ":")),
        },
    }
