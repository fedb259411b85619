"""Decode and validate OpenAI request bodies into a :class:`GenerationRequest`.

A body is decoded straight into its :mod:`services.gateway.bodies` Struct (JSON syntax,
UTF-8, nesting depth, types, ranges and enums in one pass); what depends on more than one
field, on the served model or on the vocabulary is checked here after. Anything wrong is a
400 (an unknown model a 404) with an OpenAI error body naming the field. Tokenization
happens in :func:`tokenize`, after validation, so the token counts can be checked against
the model's context length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import msgspec

from libs.protocol.messages import SamplingParams, StructuredOutput
from services.gateway import bodies
from services.gateway.bodies import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest
from services.gateway.errors import ApiError, invalid
from services.gateway.tokenizer import ModelTokenizer
from services.gateway.tools import ToolMode, ToolSpec, check_json_schema, tool_spec

MAX_STOP_STRINGS = bodies.MAX_STOP_STRINGS
MAX_INT32 = bodies.MAX_INT32
MAX_SUBREQUESTS = 64  # prompts x best_of in one request

S = TypeVar("S", bound=msgspec.Struct)


class Endpoint(str, Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass
class Prompt:
    """One prompt of a request: text to tokenize, or token ids."""

    text: str | None = None
    token_ids: list[int] = field(default_factory=list)


@dataclass
class GenerationRequest:
    """A validated request, ready to be placed once every prompt's ``token_ids`` is filled in.

    One HTTP request becomes ``len(prompts) * best_of`` sub-requests on the cluster; the
    response carries ``len(prompts) * n`` choices.
    """

    endpoint: Endpoint
    model: str
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    prompts: list[Prompt] = field(default_factory=list)
    messages: list[dict[str, Any]] | None = None  # chat messages, content flattened to text
    tools: ToolSpec | None = None  # chat: the tools and how the output is read (None: plain text)
    n: int = 1
    best_of: int = 1
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token; None = no logprobs
    max_tokens_given: bool = False
    add_generation_prompt: bool = True
    timing: bool = False  # extension ``flowkv_timing``: add per-request timings (``flowkv``) to the response
    # Extensions ``flowkv_ttft_slo_s`` / ``flowkv_tpot_slo_s``: the request's own objectives,
    # sent to the scheduler in every PlaceRequest (0: the deployment's).
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0

    @property
    def prompt_token_ids(self) -> list[int]:
        """The first prompt's token ids (the only prompt of a chat request)."""
        return self.prompts[0].token_ids


# --- decoding --------------------------------------------------------------------------------

_AT = re.compile(r" - at `(?:key` in `)?\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]+)`")


def _param(path: str) -> str | None:
    path = path.lstrip(".").replace("[...]", "")  # "[...]": a value of a mapping (logit_bias)
    return path or None


def validation_error(exc: msgspec.ValidationError) -> ApiError:
    """The 400 for a msgspec validation error: its message, the field it names, and a code
    (``missing_required_parameter``, ``unknown_parameter``, ``invalid_type`` or ``invalid_value``)."""
    text = str(exc)
    m = _AT.search(text)
    path = m.group("path") if m else ""
    head = text[: m.start()] if m else text
    if mm := _MISSING.match(head):
        name = mm.group("name")
        return invalid(f"'{name}' is required" + (f" in '{_param(path)}'" if _param(path) else ""),
                       _param(f"{path}.{name}"), "missing_required_parameter")
    if mu := _UNKNOWN.match(head):
        name = mu.group("name")
        return invalid(f"unknown field '{name}'" + (f" in '{_param(path)}'" if _param(path) else ""),
                       _param(f"{path}.{name}"), "unknown_parameter")
    param = _param(path)
    code = "invalid_type" if ", got `" in head else "invalid_value"
    return invalid(f"{head}" + (f" at '{param}'" if param else ""), param, code)


def decode(body: bytes | Any, type_: type[S]) -> S:
    """Decode ``body`` (raw JSON bytes, or an already parsed object) into ``type_``.

    Raises:
        ApiError: 400 for malformed JSON, invalid UTF-8, nesting too deep, or any field that
            breaks the Struct's types or bounds.
    """
    try:
        if isinstance(body, (bytes, bytearray, memoryview)):
            return msgspec.json.decode(body, type=type_)
        return msgspec.convert(body, type_)
    except msgspec.ValidationError as exc:
        if "Expected `object`" in str(exc) and " - at `" not in str(exc):
            raise invalid("the request body must be a JSON object", None, "invalid_type") from None
        raise validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    except RecursionError:
        raise invalid("the request body is nested too deeply", None, "invalid_json") from None


# --- checks across fields ---------------------------------------------------------------------

def check_model(model: str | None, served: str | Collection[str]) -> None:
    """404 unless ``model`` is absent or one of the served names (``served``: one or several)."""
    names = {served} if isinstance(served, str) else served
    if model is not None and model not in names:
        raise ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")


def _stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _regex(pattern: str, param: str) -> str:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise invalid(f"'{param}' is not a valid regular expression: {exc}", param) from None
    return pattern


def _structured(b: CompletionRequest | ChatCompletionRequest) -> StructuredOutput | None:
    """The one output constraint the body asks for, from ``response_format``, vLLM's
    ``structured_outputs`` or its ``guided_*`` fields (400 if more than one)."""
    found: list[tuple[str, StructuredOutput]] = []
    fmt = b.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", StructuredOutput(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise invalid("response_format type 'json_schema' needs 'json_schema.schema'", "response_format.json_schema",
                          "missing_required_parameter")
        found.append(("response_format", StructuredOutput(json_schema=check_json_schema(fmt.json_schema.schema_,
                                                                                   "response_format.json_schema.schema"))))
    so = b.structured_outputs
    if so is not None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(so, k) is not None] + (
            ["json_object"] if so.json_object else [])
        if len(given) != 1:
            raise invalid("'structured_outputs' must set exactly one of json, regex, choice, grammar, json_object",
                          "structured_outputs")
        key = given[0]
        found.append(("structured_outputs", StructuredOutput(
            json_schema=check_json_schema(so.json, "structured_outputs.json") if key == "json" else None,
            json_object=key == "json_object",
            regex=_regex(so.regex, "structured_outputs.regex") if so.regex is not None else None,
            choice=list(so.choice) if so.choice is not None else None,
            grammar=so.grammar)))
    if b.guided_json is not None:
        found.append(("guided_json", StructuredOutput(json_schema=check_json_schema(b.guided_json, "guided_json"))))
    if b.guided_regex is not None:
        found.append(("guided_regex", StructuredOutput(regex=_regex(b.guided_regex, "guided_regex"))))
    if b.guided_choice is not None:
        found.append(("guided_choice", StructuredOutput(choice=list(b.guided_choice))))
    if b.guided_grammar is not None:
        found.append(("guided_grammar", StructuredOutput(grammar=b.guided_grammar)))
    if len(found) > 1:
        raise invalid(f"only one output constraint may be given, got {', '.join(n for n, _ in found)}", found[1][0])
    return found[0][1] if found else None


def _sampling(b: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> SamplingParams:
    min_tokens = b.min_tokens or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise invalid(f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens})", "min_tokens")
    return SamplingParams(
        # Without max_tokens the real value is set once the prompt's length is known.
        max_tokens=max_tokens or max(1, min_tokens),
        temperature=1.0 if b.temperature is None else b.temperature,
        top_p=1.0 if b.top_p is None else b.top_p,
        top_k=max(b.top_k or 0, 0),
        min_p=b.min_p or 0.0,
        seed=b.seed,
        stop=_stop(b.stop),
        stop_token_ids=list(b.stop_token_ids or []),
        ignore_eos=bool(b.ignore_eos),
        min_tokens=min_tokens,
        presence_penalty=b.presence_penalty or 0.0,
        frequency_penalty=b.frequency_penalty or 0.0,
        repetition_penalty=1.0 if b.repetition_penalty is None else b.repetition_penalty,
        logit_bias={int(k): v for k, v in (b.logit_bias or {}).items()},
        structured=_structured(b),
    )


def _common(b: CompletionRequest | ChatCompletionRequest, endpoint: Endpoint, served_model: str | Collection[str],
            max_tokens: int | None) -> GenerationRequest:
    check_model(b.model, served_model)
    opts = b.stream_options
    req = GenerationRequest(endpoint, b.model, _sampling(b, max_tokens), stream=bool(b.stream),
                            include_usage=bool(opts is not None and opts.include_usage))
    req.max_tokens_given = max_tokens is not None
    req.timing = bool(b.flowkv_timing)
    req.ttft_slo_s = b.flowkv_ttft_slo_s or 0.0
    req.tpot_slo_s = b.flowkv_tpot_slo_s or 0.0
    req.n = b.n or 1
    if max_tokens is None and endpoint is Endpoint.COMPLETIONS:
        req.sampling.max_tokens = 16  # OpenAI's completions default; chat defaults to the room left
    return req


def parse_completion(body: bytes | Any, served_model: str | Collection[str]) -> GenerationRequest:
    """Validate a ``/v1/completions`` body (its prompts not yet tokenized if they are text);
    ``served_model``: the served name, or the names, its ``model`` must be one of."""
    b = decode(body, CompletionRequest)
    req = _common(b, Endpoint.COMPLETIONS, served_model, b.max_tokens)
    req.logprobs = b.logprobs
    req.echo = bool(b.echo)
    if b.suffix:
        raise invalid("'suffix' is not supported", "suffix", "unsupported_value")
    req.best_of = b.best_of or req.n
    if req.best_of < req.n:
        raise invalid(f"'best_of' ({req.best_of}) must not be less than 'n' ({req.n})", "best_of")
    if req.stream and req.best_of > req.n:
        raise invalid("'best_of' larger than 'n' cannot be streamed", "best_of", "unsupported_value")
    if req.echo and req.logprobs is not None:
        raise invalid("'echo' with 'logprobs' (the prompt's logprobs) is not supported", "echo", "unsupported_value")
    prompt = b.prompt
    if isinstance(prompt, str):
        req.prompts = [Prompt(text=prompt)]
    elif all(isinstance(p, int) for p in prompt):
        req.prompts = [Prompt(token_ids=list(prompt))]  # type: ignore[arg-type]
    elif all(isinstance(p, str) for p in prompt):
        req.prompts = [Prompt(text=p) for p in prompt]  # type: ignore[misc]
    elif all(isinstance(p, list) for p in prompt):
        req.prompts = [Prompt(token_ids=list(p)) for p in prompt]  # type: ignore[arg-type]
    else:
        raise invalid("'prompt' must be a string, a list of token ids, a list of strings or a list of token-id lists",
                      "prompt", "invalid_type")
    if len(req.prompts) > MAX_PROMPTS:
        raise invalid(f"'prompt' takes at most {MAX_PROMPTS} prompts", "prompt")
    if len(req.prompts) * req.best_of > MAX_SUBREQUESTS:
        raise invalid(f"prompts x best_of (or n) must be at most {MAX_SUBREQUESTS}", "n")
    return req


def _content_text(m: bodies.ChatMessage, i: int) -> str:
    content = m.content
    if content is None:
        if m.role == "assistant":
            return ""
        raise invalid(f"messages[{i}].content is required for role '{m.role}'", f"messages[{i}].content",
                      "missing_required_parameter")
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def chat_messages(messages: list[bodies.ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template reads them: content flattened to text; an assistant's
    ``tool_calls`` with their arguments parsed into objects (as vLLM hands them to templates)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _content_text(m, i)}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise invalid(f"messages[{i}].tool_calls is only allowed on an assistant message",
                              f"messages[{i}].tool_calls")
            calls = []
            for c in m.tool_calls:
                try:
                    args: Any = json.loads(c.function.arguments)
                except (ValueError, RecursionError):
                    args = c.function.arguments
                calls.append({"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": args}})
            d["tool_calls"] = calls
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id or ""
        out.append(d)
    return out


def parse_chat(body: bytes | Any, served_model: str | Collection[str]) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body; messages are flattened to role + text;
    ``served_model`` as for :func:`parse_completion`."""
    b = decode(body, ChatCompletionRequest)
    max_tokens = b.max_completion_tokens or b.max_tokens
    req = _common(b, Endpoint.CHAT, served_model, max_tokens)
    req.best_of = req.n
    if b.logprobs:
        req.logprobs = b.top_logprobs or 0
    elif b.top_logprobs is not None:
        raise invalid("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    req.messages = chat_messages(b.messages)
    req.prompts = [Prompt()]
    req.add_generation_prompt = b.add_generation_prompt is not False
    req.tools = tool_spec(b.tools, b.tool_choice, b.parallel_tool_calls)
    if req.tools is not None and req.tools.mode in (ToolMode.REQUIRED, ToolMode.NAMED):
        if req.sampling.structured is not None:
            raise invalid("tool_choice 'required' or a named function cannot be combined with another output "
                          "constraint", "tool_choice")
        req.sampling.structured = StructuredOutput(json_schema=json.dumps(req.tools.schema()))
    return req


# --- tokenization -----------------------------------------------------------------------------

def _check_ids(ids: list[int], vocab_size: int, param: str) -> None:
    if any(t < 0 or t >= vocab_size for t in ids):
        raise invalid(f"token ids must be in [0, {vocab_size})", param, "invalid_value")


def render_chat(mt: ModelTokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool) -> str:
    """The conversation as prompt text, through the model's chat template."""
    try:
        text = mt.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=False, tools=tools)
    except Exception as exc:  # the template raised (raise_exception) or read a field it lacks
        raise invalid(f"the chat template cannot render these messages: {exc}", "messages") from None
    return str(text)


def tokenize(req: GenerationRequest, mt: ModelTokenizer) -> None:
    """Fill every prompt's ``token_ids`` and check the lengths against the model's.

    Args:
        req: a request from :func:`parse_completion` or :func:`parse_chat`.
        mt: the model's tokenizer and context length.
    """
    tok = mt.tokenizer
    if req.messages is not None:
        text = render_chat(mt, req.messages, req.tools.definitions if req.tools else None, req.add_generation_prompt)
        req.prompts[0].token_ids = tok.encode(text, add_special_tokens=False)
    for p in req.prompts:
        if p.text is not None:
            p.token_ids = tok.encode(p.text, add_special_tokens=False)
    s = req.sampling
    _check_ids(s.stop_token_ids, mt.vocab_size, "stop_token_ids")
    _check_ids(list(s.logit_bias), mt.vocab_size, "logit_bias")
    longest = 0
    for p in req.prompts:
        if not p.token_ids:
            raise invalid("the prompt is empty after tokenization", "prompt")
        _check_ids(p.token_ids, mt.vocab_size, "messages" if req.messages is not None else "prompt")
        longest = max(longest, len(p.token_ids))
    room = mt.max_model_len - longest
    if not req.max_tokens_given:
        s.max_tokens = max(1, min(s.max_tokens, room) if req.endpoint is Endpoint.COMPLETIONS else room)
    if s.min_tokens > s.max_tokens:
        raise invalid(
            f"'min_tokens' ({s.min_tokens}) must not exceed the {s.max_tokens} output "
            "tokens this request may produce", "min_tokens")
    if room < 1 or s.max_tokens > room:
        raise invalid(
            f"This model's maximum context length is {mt.max_model_len} tokens; the prompt has {longest} tokens "
            f"and {s.max_tokens} were requested for the output",
            "max_tokens" if room >= 1 else ("messages" if req.messages is not None else "prompt"),
            "context_length_exceeded",
        )
    if req.logprobs is not None:
        s.logprobs = req.logprobs
    elif req.best_of > req.n:
        s.logprobs = 0  # the sampled tokens' logprobs rank the candidates
