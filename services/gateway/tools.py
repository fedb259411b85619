"""Tool calling: which tools a chat request offers, and reading tool calls out of the output.

Four ``tool_choice`` modes, as vLLM's server has them:

- ``none``: the output is text; the tools are still shown to the chat template.
- ``auto`` (the default when ``tools`` is given): the model decides. Calls are read from the
  text in the Hermes format (vLLM's ``hermes`` parser): ``<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>``, one block per call; the text before the first block is
  the message's content. Output that does not parse is returned as content.
- ``required``: the output is constrained by a JSON Schema to a non-empty JSON array of
  ``{"name": <one of the tools>, "parameters": {...}}`` objects, so it always parses.
- a named function: the output is constrained by that function's ``parameters`` schema and
  is the call's arguments.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from services.gateway import bodies
from services.gateway.errors import invalid

_CALL_START = "<tool_call>"
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class ToolMode(str, Enum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass
class ToolSpec:
    """The tools of a chat request and how its output is read."""

    mode: ToolMode
    definitions: list[dict[str, Any]]  # the tools as the chat template reads them (OpenAI shape)
    name: str = ""  # NAMED: the function the model must call
    parallel: bool = True  # REQUIRED: more than one call allowed

    def _parameters(self, name: str) -> dict[str, Any]:
        for d in self.definitions:
            if d["function"]["name"] == name:
                return d["function"].get("parameters") or {"type": "object"}
        raise KeyError(name)

    def schema(self) -> dict[str, Any]:
        """The JSON Schema that constrains a REQUIRED or NAMED output."""
        if self.mode is ToolMode.NAMED:
            return self._parameters(self.name)
        one_of = [{"type": "object",
                   "properties": {"name": {"type": "string", "enum": [d["function"]["name"]]},
                                  "parameters": self._parameters(d["function"]["name"])},
                   "required": ["name", "parameters"], "additionalProperties": False} for d in self.definitions]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema


def check_json_schema(schema: Any, param: str) -> str:
    """A JSON Schema (an object, or JSON text of one) as JSON text, after checking it is one.

    Raises:
        ApiError: 400 naming ``param`` if it is not JSON or not a valid JSON Schema.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError):
            raise invalid(f"'{param}' is not valid JSON", param) from None
    if not isinstance(schema, (dict, bool)):
        raise invalid(f"'{param}' must be a JSON Schema object", param, "invalid_type")
    import jsonschema  # loaded by the first request that carries a schema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
        return json.dumps(schema)
    except jsonschema.SchemaError as exc:
        raise invalid(f"'{param}' is not a valid JSON Schema: {exc.message}", param) from None
    except (RecursionError, ValueError, TypeError):
        raise invalid(f"'{param}' is not a valid JSON Schema", param) from None


def tool_spec(tools: list[bodies.Tool] | None, choice: str | bodies.NamedToolChoice | None,
              parallel: bool | None) -> ToolSpec | None:
    """Check ``tools`` against ``tool_choice``; None when the output is plain text and no tool is given."""
    if not tools:
        if choice is not None and choice != "none":
            raise invalid("'tool_choice' needs 'tools'", "tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tool function names must be unique", "tools")
    definitions = []
    for t in tools:
        fn: dict[str, Any] = {"name": t.function.name}
        if t.function.description is not None:
            fn["description"] = t.function.description
        if t.function.parameters is not None:
            check_json_schema(t.function.parameters, "tools.function.parameters")
            fn["parameters"] = t.function.parameters
        definitions.append({"type": "function", "function": fn})
    if isinstance(choice, bodies.NamedToolChoice):
        if choice.function.name not in names:
            raise invalid(f"tool_choice names '{choice.function.name}', which is not among the tools",
                          "tool_choice")
        return ToolSpec(ToolMode.NAMED, definitions, name=choice.function.name)
    mode = ToolMode(choice or "auto")
    return ToolSpec(mode, definitions, parallel=parallel is not False)


def new_call_id() -> str:
    return f"chatcmpl-tool-{secrets.token_hex(12)}"


def _call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def parse_calls(spec: ToolSpec, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Read the tool calls out of a whole output: ``(content, tool_calls)``.

    With no call found (or output that does not parse) the whole text is the content.
    """
    if spec.mode is ToolMode.NAMED:
        try:
            json.loads(text)
        except (ValueError, RecursionError):
            return text, []
        return None, [_call(spec.name, text)]
    if spec.mode is ToolMode.REQUIRED:
        try:
            items = json.loads(text)
        except (ValueError, RecursionError):
            return text, []
        if not isinstance(items, list) or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) for c in items):
            return text, []
        return None, [_call(c["name"], c.get("parameters", {})) for c in items]
    if spec.mode is ToolMode.AUTO and _CALL_START in text:
        calls = []
        for block in _CALL_BLOCK.findall(text):
            try:
                obj = json.loads(block)
            except (ValueError, RecursionError):
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            calls.append(_call(obj["name"], obj.get("arguments", {})))
        content = text[: text.index(_CALL_START)]
        return (content or None), calls
    return text, []


@dataclass
class ToolStream:
    """Turns one choice's streamed text into OpenAI chat deltas while reading tool calls.

    NAMED streams the arguments as they come (the first delta names the function);
    REQUIRED holds the output and sends each call whole at the end; AUTO streams content
    until a ``<tool_call>`` may begin, then holds the rest and sends the calls at the end.
    """

    spec: ToolSpec
    held: str = ""
    streamed: str = ""
    called: bool = False
    _named_id: str = field(default_factory=new_call_id)

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas for ``text`` (possibly none while output is held)."""
        if not text:
            return []
        mode = self.spec.mode
        if mode is ToolMode.NAMED:
            out = []
            if not self.called:
                self.called = True
                out.append({"tool_calls": [{"index": 0, "id": self._named_id, "type": "function",
                                            "function": {"name": self.spec.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return out
        if mode is ToolMode.REQUIRED:
            self.held += text
            return []
        if mode is ToolMode.AUTO:
            self.held += text
            if _CALL_START in self.held:
                return []
            # Send what cannot be the start of a call block; hold a possible partial "<tool_call>".
            keep = 0
            for k in range(1, len(_CALL_START)):
                if self.held.endswith(_CALL_START[:k]):
                    keep = k
            send, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
            self.streamed += send
            return [{"content": send}] if send else []
        return [{"content": text}]

    def finish(self) -> list[dict[str, Any]]:
        """The deltas of whatever was held, at the end of the output."""
        mode = self.spec.mode
        if mode is ToolMode.NAMED or not self.held:
            return []
        held, self.held = self.held, ""
        content, calls = parse_calls(self.spec, held)
        if mode is ToolMode.AUTO and calls:
            out = [{"content": content}] if content else []
            self.called = True
            return out + [{"tool_calls": [{"index": i, **c}]} for i, c in enumerate(calls)]
        if calls:
            self.called = True
            return [{"tool_calls": [{"index": i, **c}]} for i, c in enumerate(calls)]
        return [{"content": held}]
