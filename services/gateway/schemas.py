"""Parse and validate OpenAI request bodies into a :class:`GenerationRequest`.

Every field is checked here, and anything wrong is a 400 (an unknown model a 404) with
an OpenAI error body naming the field; unknown fields are ignored. Tokenization happens
in :func:`tokenize`, after validation, so the token counts can be checked against the
model's context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from libs.protocol.messages import SamplingParams
from services.gateway.errors import ApiError, invalid
from services.gateway.tokenizer import ModelTokenizer

MAX_STOP_STRINGS = 4
MAX_INT32 = 2**31 - 1
_ROLES = {"system", "developer", "user", "assistant", "tool"}


class Endpoint(str, Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass
class GenerationRequest:
    """A validated request, ready to be placed once ``prompt_token_ids`` is filled in."""

    endpoint: Endpoint
    model: str
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    prompt: str | None = None  # text to tokenize (completions), or None
    messages: list[dict[str, str]] | None = None  # chat messages, content flattened to text
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token; None = no logprobs
    max_tokens_given: bool = False
    timing: bool = False  # extension ``flowkv_timing``: add per-request timings (``flowkv``) to the response


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt_int(body: dict[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise invalid(f"'{name}' must be an integer", name, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise invalid(f"'{name}' must be {bounds}, got {v}", name)
    return v


def _opt_number(body: dict[str, Any], name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise invalid(f"'{name}' must be a number", name, "invalid_type")
    return float(v)


def _opt_bool(body: dict[str, Any], name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid(f"'{name}' must be a boolean", name, "invalid_type")
    return v


def _stop(body: dict[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    if any(s == "" for s in stops):
        raise invalid("'stop' strings must not be empty", "stop")
    return list(stops)


def _unsupported(body: dict[str, Any]) -> None:
    """Fields we accept only at their neutral value (rather than silently ignoring them)."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and (not _is_number(v) or not -2.0 <= v <= 2.0):
            raise invalid(f"'{name}' must be a number between -2 and 2", name)
        if v:
            raise invalid(f"'{name}' other than 0 is not supported", name, "unsupported_value")
    if body.get("n") is not None and (not _is_int(body["n"]) or body["n"] != 1):
        raise invalid("only 'n' = 1 is supported", "n", "unsupported_value")
    if body.get("best_of") is not None and body["best_of"] != 1:
        raise invalid("only 'best_of' = 1 is supported", "best_of", "unsupported_value")
    if body.get("logit_bias"):
        raise invalid("'logit_bias' is not supported", "logit_bias", "unsupported_value")
    if body.get("echo"):
        raise invalid("'echo' is not supported", "echo", "unsupported_value")
    if body.get("suffix"):
        raise invalid("'suffix' is not supported", "suffix", "unsupported_value")
    if body.get("tools"):
        raise invalid("'tools' are not supported", "tools", "unsupported_value")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise invalid("only response_format type 'text' is supported", "response_format", "unsupported_value")


def _sampling(body: dict[str, Any], max_tokens: int | None) -> SamplingParams:
    temperature = _opt_number(body, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise invalid(f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
    top_p = _opt_number(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise invalid(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    # Bounded so every value fits the wire's 64-bit integers (a larger one was a 500).
    top_k = _opt_int(body, "top_k", lo=-1, hi=MAX_INT32)
    seed = _opt_int(body, "seed", lo=-(2**63), hi=2**63 - 1)
    min_tokens = _opt_int(body, "min_tokens", lo=0, hi=MAX_INT32) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise invalid(f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens})", "min_tokens")
    return SamplingParams(
        # Without max_tokens the real value is set once the prompt's length is known.
        max_tokens=max_tokens or max(1, min_tokens),
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k or 0, 0),
        seed=seed,
        stop=_stop(body),
        ignore_eos=_opt_bool(body, "ignore_eos"),
        min_tokens=min_tokens,
    )


def _common(body: Any, endpoint: Endpoint, served_model: str) -> GenerationRequest:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a string", "model", "missing_required_parameter" if model is None else "invalid_type")
    if model != served_model:
        raise ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    _unsupported(body)
    if "user" in body and not isinstance(body["user"], str):
        raise invalid("'user' must be a string", "user", "invalid_type")
    max_tokens = _opt_int(body, "max_tokens", lo=1, hi=MAX_INT32)
    if endpoint is Endpoint.CHAT:
        max_tokens = _opt_int(body, "max_completion_tokens", lo=1, hi=MAX_INT32) or max_tokens
    stream = _opt_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
    if opts and "include_usage" in opts and not isinstance(opts["include_usage"], bool):
        raise invalid("'stream_options.include_usage' must be a boolean", "stream_options", "invalid_type")
    include_usage = bool(opts and opts.get("include_usage") is True)
    req = GenerationRequest(endpoint, model, _sampling(body, max_tokens), stream=stream, include_usage=include_usage)
    req.max_tokens_given = max_tokens is not None
    req.timing = _opt_bool(body, "flowkv_timing")
    if max_tokens is None and endpoint is Endpoint.COMPLETIONS:
        req.sampling.max_tokens = 16  # OpenAI's completions default; chat defaults to the room left
    return req


def parse_completion(body: Any, served_model: str) -> GenerationRequest:
    """Validate a ``/v1/completions`` body (prompt not yet tokenized if it is text)."""
    req = _common(body, Endpoint.COMPLETIONS, served_model)
    req.logprobs = _opt_int(body, "logprobs", lo=0, hi=5)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("'prompt' must not be empty", "prompt")
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        req.prompt_token_ids = list(prompt)
    elif isinstance(prompt, list) and not prompt:
        raise invalid("'prompt' must not be empty", "prompt")
    elif prompt is None:
        raise invalid("'prompt' is required", "prompt", "missing_required_parameter")
    else:
        raise invalid("'prompt' must be a string, a list of one string, or a list of token ids", "prompt", "invalid_type")
    return req


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}].content parts must be text parts", f"messages[{i}].content", "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content", "invalid_type")


def parse_chat(body: Any, served_model: str) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body; messages are flattened to role + text."""
    req = _common(body, Endpoint.CHAT, served_model)
    if _opt_bool(body, "logprobs"):
        req.logprobs = _opt_int(body, "top_logprobs", lo=0, hi=20) or 0
    elif body.get("top_logprobs") is not None:
        _opt_int(body, "top_logprobs", lo=0, hi=20)
        raise invalid("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    messages = body.get("messages")
    if messages is None:
        raise invalid("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise invalid(f"messages[{i}].role must be one of {sorted(_ROLES)}", f"messages[{i}].role")
        if "name" in m and not isinstance(m["name"], str):  # a participant's name: not used, but typed
            raise invalid(f"messages[{i}].name must be a string", f"messages[{i}].name", "invalid_type")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append({"role": "system" if role == "developer" else role, "content": _content_text(content, i)})
    req.messages = out
    return req


def tokenize(req: GenerationRequest, mt: ModelTokenizer) -> None:
    """Fill ``req.prompt_token_ids`` and check the lengths against the model's.

    Args:
        req: a request from :func:`parse_completion` or :func:`parse_chat`.
        mt: the model's tokenizer and context length.
    """
    tok = mt.tokenizer
    if req.messages is not None:
        text = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
        req.prompt_token_ids = tok.encode(text, add_special_tokens=False)
    elif req.prompt is not None:
        req.prompt_token_ids = tok.encode(req.prompt, add_special_tokens=False)
    ids = req.prompt_token_ids
    if not ids:
        raise invalid("the prompt is empty after tokenization", "prompt")
    if any(t < 0 or t >= mt.vocab_size for t in ids):
        raise invalid(f"token ids must be in [0, {mt.vocab_size})", "prompt", "invalid_value")
    room = mt.max_model_len - len(ids)
    if not req.max_tokens_given:
        req.sampling.max_tokens = min(req.sampling.max_tokens, room) if req.endpoint is Endpoint.COMPLETIONS else room
    if req.sampling.min_tokens > req.sampling.max_tokens:
        raise invalid(
            f"'min_tokens' ({req.sampling.min_tokens}) must not exceed the {req.sampling.max_tokens} output "
            "tokens this request may produce", "min_tokens")
    if room < 1 or req.sampling.max_tokens > room:
        raise invalid(
            f"This model's maximum context length is {mt.max_model_len} tokens; the prompt has {len(ids)} tokens "
            f"and {req.sampling.max_tokens} were requested for the output",
            "max_tokens" if room >= 1 else ("messages" if req.messages is not None else "prompt"),
            "context_length_exceeded",
        )
    if req.logprobs is not None:
        req.sampling.logprobs = req.logprobs
