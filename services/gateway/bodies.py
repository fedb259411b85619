"""The request bodies of the OpenAI endpoints, defined once.

Each body is a ``msgspec.Struct``: the gateway decodes a request straight into it (so the
JSON parse and the type, range and enum checks are one pass, and a wrong type anywhere is
a 400 naming the field), and :mod:`services.gateway.openapi` generates the OpenAPI
document from the same classes with ``msgspec.json.schema_components``. What a schema
cannot say (a field that depends on another, token ids within the vocabulary) is checked
after decoding, in :mod:`services.gateway.schemas`.

Unknown top-level fields are ignored, as vLLM's server does (clients send vendor
extensions); nested objects whose every field the API defines (``response_format``,
``tools``, ``tool_choice``, ``stream_options``) refuse unknown fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

MAX_INT32 = 2**31 - 1
MAX_STOP_STRINGS = 4
MAX_N = 16  # choices per prompt (n, best_of)
MAX_PROMPTS = 32  # prompts in one /v1/completions batch
MAX_LOGIT_BIAS = 300  # entries, as OpenAI bounds it
MAX_TOOLS = 128

Int32 = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32)]
PosInt32 = Annotated[int, msgspec.Meta(ge=1, le=MAX_INT32)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0.0)]  # a positive, finite number of seconds
FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
# A JSON Schema: an object (validated as JSON Schema after decoding).
JsonSchema = dict[str, Any]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``stream_options``: what a streamed response adds."""

    include_usage: bool | None = None


class JsonSchemaFormat(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``response_format.json_schema``."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "response"
    description: str | None = None
    schema_: JsonSchema | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``response_format``: ``text``, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, omit_defaults=True):
    """vLLM's ``structured_outputs`` object (exactly one constraint; other vLLM options are ignored)."""

    json: JsonSchema | str | None = None
    regex: NonEmpty | None = None
    choice: Annotated[list[NonEmpty], msgspec.Meta(min_length=1)] | None = None
    grammar: NonEmpty | None = None
    json_object: bool | None = None


class _Sampling(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The fields both generation endpoints take."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    max_tokens: PosInt32 | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=MAX_INT32)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    seed: Seed | None = None
    stop: NonEmpty | Annotated[list[NonEmpty], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=64)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=2.0)] | None = None
    logit_bias: Annotated[
        dict[Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,10}$")], Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]],
        msgspec.Meta(max_length=MAX_LOGIT_BIAS),
    ] | None = None
    user: str | None = None
    ignore_eos: bool | None = None
    min_tokens: Int32 | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchema | str | None = None
    guided_regex: NonEmpty | None = None
    guided_choice: Annotated[list[NonEmpty], msgspec.Meta(min_length=1)] | None = None
    guided_grammar: NonEmpty | None = None
    flowkv_timing: bool | None = None  # extension: per-request timings in the response
    # Extension: the request's own service-level objectives, which the scheduler's flowkv
    # policy counts it against (absent: the deployment's ttft_slo_s / tpot_slo_s).
    flowkv_ttft_slo_s: Seconds | None = None
    flowkv_tpot_slo_s: Seconds | None = None


class CompletionRequest(_Sampling, kw_only=True, omit_defaults=True):
    """``POST /v1/completions``.

    ``prompt`` is a string, a list of token ids, or a batch: a list of strings or of token-id
    lists (one choice set per prompt; choice ``index`` = prompt * n + choice).
    """

    prompt: NonEmpty | Annotated[list[NonEmpty | TokenId | Annotated[list[TokenId], msgspec.Meta(min_length=1)]],
                                 msgspec.Meta(min_length=1)]
    best_of: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = None
    echo: bool | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    suffix: str | None = None


class TextPart(msgspec.Struct, omit_defaults=True):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class FunctionCall(msgspec.Struct, forbid_unknown_fields=True):
    """The function a tool call calls, with its arguments as JSON text."""

    name: FunctionName
    arguments: str


class ToolCall(msgspec.Struct, forbid_unknown_fields=True):
    """A tool call of an earlier assistant message."""

    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct, omit_defaults=True):
    """One message of the conversation. ``content`` may be null only on an assistant message."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A callable function: its name and its arguments' JSON Schema."""

    name: FunctionName
    description: str | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    """A tool the model may call."""

    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(msgspec.Struct, forbid_unknown_fields=True):
    """The function a named ``tool_choice`` names."""

    name: FunctionName


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    """``tool_choice`` naming the one function the model must call."""

    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(_Sampling, kw_only=True, omit_defaults=True):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: PosInt32 | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = None  # vLLM's: end the prompt with an assistant turn (default true)


class TokenizeCompletion(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``POST /tokenize`` with a prompt."""

    prompt: str
    model: str | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``POST /tokenize`` with chat messages (rendered with the chat template first)."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    model: str | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None


class Detokenize(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``POST /detokenize``."""

    tokens: list[TokenId]
    model: str | None = None


REQUEST_BODIES: tuple[type[msgspec.Struct], ...] = (
    CompletionRequest, ChatCompletionRequest, TokenizeCompletion, TokenizeChat, Detokenize,
)
