"""``/tokenize`` and ``/detokenize``, as vLLM's server has them.

``POST /tokenize`` takes ``{"prompt": text}`` (``add_special_tokens``, default true) or
``{"messages": [...]}`` rendered through the chat template first (``add_generation_prompt``,
default true; ``tools``); it answers ``{"count", "max_model_len", "tokens"}`` and
``token_strs`` when ``return_token_strs`` is true. ``POST /detokenize`` takes
``{"tokens": [ids]}`` and answers ``{"prompt": text}``. ``model`` picks the served model
whose tokenizer (and chat template) is used; absent, the gateway's first model.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from services.gateway import bodies
from services.gateway.errors import invalid
from services.gateway.openai_routes import read_body
from services.gateway.schemas import chat_messages, decode, render_chat
from services.gateway.state import STATE
from services.gateway.tools import tool_spec


def _parse_any(raw: bytes) -> Any:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    except RecursionError:
        raise invalid("the request body is nested too deeply", None, "invalid_json") from None


async def tokenize(request: web.Request) -> web.Response:
    st = request.app[STATE]
    body = _parse_any(await read_body(request, st.config.max_body_bytes))
    if isinstance(body, dict) and "messages" in body:
        chat = decode(body, bodies.TokenizeChat)
        mt = st.served(chat.model).tokenizer
        spec = tool_spec(chat.tools, None, None)
        text = await asyncio.to_thread(render_chat, mt, chat_messages(chat.messages),
                                       spec.definitions if spec else None, chat.add_generation_prompt)
        add_special, want_strs = chat.add_special_tokens, chat.return_token_strs
    else:
        plain = decode(body, bodies.TokenizeCompletion)
        mt = st.served(plain.model).tokenizer
        text, add_special, want_strs = plain.prompt, plain.add_special_tokens, plain.return_token_strs
    ids = await asyncio.to_thread(mt.tokenizer.encode, text, add_special_tokens=add_special)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": mt.max_model_len, "tokens": ids}
    if want_strs:
        out["token_strs"] = [mt.tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                             for t in ids]
    return web.json_response(out)


async def detokenize(request: web.Request) -> web.Response:
    st = request.app[STATE]
    body = decode(await read_body(request, st.config.max_body_bytes), bodies.Detokenize)
    mt = st.served(body.model).tokenizer
    if any(t >= mt.vocab_size for t in body.tokens):
        raise invalid(f"token ids must be in [0, {mt.vocab_size})", "tokens")
    text = await asyncio.to_thread(mt.tokenizer.decode, body.tokens)
    return web.json_response({"prompt": text})
