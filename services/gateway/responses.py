"""Build OpenAI response objects (completions and chat, whole and streamed chunks)."""

from __future__ import annotations

import time
from typing import Any

from libs.protocol.messages import TokenLogprob
from services.gateway.schemas import Endpoint


def usage(num_prompt: int, num_completion: int, num_cached: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
    }
    if num_cached:
        out["prompt_tokens_details"] = {"cached_tokens": num_cached}
    return out


def _token_str(tok: Any, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


class LogprobsBuilder:
    """Accumulates per-token logprobs in the endpoint's OpenAI shape."""

    def __init__(self, endpoint: Endpoint, tokenizer: Any) -> None:
        self.endpoint = endpoint
        self.tok = tokenizer
        self.offset = 0

    def build(self, token_ids: list[int], logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
        """OpenAI logprobs of ``token_ids`` (missing entries become null logprobs)."""
        entries = list(logprobs or [])
        entries += [None] * (len(token_ids) - len(entries))  # type: ignore[list-item]
        if self.endpoint is Endpoint.CHAT:
            content = []
            for tid, lp in zip(token_ids, entries):
                s = _token_str(self.tok, tid)
                top = [] if lp is None else [
                    {"token": _token_str(self.tok, t), "logprob": v, "bytes": list(_token_str(self.tok, t).encode())} for t, v in zip(lp.top_token_ids, lp.top_logprobs)
                ]
                content.append({"token": s, "logprob": None if lp is None else lp.logprob, "bytes": list(s.encode()), "top_logprobs": top})
            return {"content": content}
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp in zip(token_ids, entries):
            s = _token_str(self.tok, tid)
            out["tokens"].append(s)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else {_token_str(self.tok, t): v for t, v in zip(lp.top_token_ids, lp.top_logprobs)})
            out["text_offset"].append(self.offset)
            self.offset += len(s)
        return out

    @staticmethod
    def merge(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not parts:
            return None
        merged: dict[str, Any] = {k: [] for k in parts[0]}
        for p in parts:
            for k, v in p.items():
                merged[k].extend(v)
        return merged


def choice(endpoint: Endpoint, index: int, text: str | None, finish_reason: str | None,
           logprobs: dict[str, Any] | None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One choice of a whole response (a chat message with its tool calls, or completion text)."""
    if endpoint is Endpoint.CHAT:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}


def whole(endpoint: Endpoint, request_id: str, model: str, created: int, choices: list[dict[str, Any]],
          usage_: dict[str, Any]) -> dict[str, Any]:
    """A whole (non-streamed) response with its choices."""
    obj = "chat.completion" if endpoint is Endpoint.CHAT else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage_}


def completion(endpoint: Endpoint, request_id: str, model: str, created: int, text: str, finish_reason: str | None,
               logprobs: dict[str, Any] | None, usage_: dict[str, Any]) -> dict[str, Any]:
    """A whole (non-streamed) response with one choice."""
    return whole(endpoint, request_id, model, created, [choice(endpoint, 0, text, finish_reason, logprobs)], usage_)


def chunk(endpoint: Endpoint, request_id: str, model: str, created: int, text: str | None, finish_reason: str | None,
          logprobs: dict[str, Any] | None = None, first: bool = False, index: int = 0,
          delta: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk with one choice (``index``); ``delta`` replaces the chat delta built from ``text``."""
    if endpoint is Endpoint.CHAT:
        if delta is None:
            delta = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
        body: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        body = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [body]}


def usage_chunk(endpoint: Endpoint, request_id: str, model: str, created: int, usage_: dict[str, Any]) -> dict[str, Any]:
    """The final streamed chunk carrying usage (``stream_options.include_usage``)."""
    obj = "chat.completion.chunk" if endpoint is Endpoint.CHAT else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


def now() -> int:
    return int(time.time())
