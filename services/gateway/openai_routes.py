"""HTTP handlers of the OpenAI endpoints: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from opentelemetry.trace import Span, SpanKind

from services.common.tracing import extract_context, tracer
from services.gateway import metrics, responses
from services.gateway.dispatch import Job
from services.gateway.errors import ApiError, invalid
from services.gateway.generation import Generation
from services.gateway.schemas import GenerationRequest, parse_chat, parse_completion, tokenize
from services.gateway.state import REQUEST_ID, STATE, GatewayState

log = logging.getLogger(__name__)

_INLINE_TOKENIZE_CHARS = 4096  # longer prompts are tokenized off the event loop
_TRACER = tracer("flowkv.gateway")


async def models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    card = {
        "id": st.config.served_model_name, "object": "model", "created": st.created, "owned_by": "flowkv",
        "max_model_len": st.tokenizer.max_model_len,
    }
    return web.json_response({"object": "list", "data": [card]})


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_completion)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_chat)


async def _read_json(request: web.Request, max_bytes: int) -> Any:
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None


async def _serve(request: web.Request, parse: Callable[[Any, str], GenerationRequest]) -> web.StreamResponse:
    # The request's trace: a root span, or a child of the client's own traceparent header.
    parent = extract_context({k.lower(): v for k, v in request.headers.items()})
    with _TRACER.start_as_current_span(f"{request.method} {request.path}", context=parent, kind=SpanKind.SERVER) as span:
        span.set_attribute("flowkv.request_id", request[REQUEST_ID])
        return await _serve_traced(request, parse, span)


async def _serve_traced(request: web.Request, parse: Callable[[Any, str], GenerationRequest],
                        span: Span) -> web.StreamResponse:
    started = time.monotonic()
    st = request.app[STATE]
    if st.stopping:
        raise ApiError(503, "the gateway is shutting down", type="server_error", code="shutting_down")
    req = parse(await _read_json(request, st.config.max_body_bytes), st.config.served_model_name)
    if (req.prompt and len(req.prompt) > _INLINE_TOKENIZE_CHARS) or req.messages:
        await asyncio.to_thread(tokenize, req, st.tokenizer)
    else:
        tokenize(req, st.tokenizer)
    request_id = request[REQUEST_ID]
    with st.admission.admit(len(req.prompt_token_ids)):
        job = Job(request_id, st.config.model, req.prompt_token_ids, req.sampling)
        gen = Generation(req, st.tokenizer.tokenizer, started)
        span.set_attribute("flowkv.tokens.prompt", len(req.prompt_token_ids))
        try:
            async with contextlib.aclosing(st.dispatcher.generate(job)) as items:
                try:
                    if req.stream:
                        return await _stream(request, st, req, gen, items)
                    return await _whole(st, req, gen, items, request_id)
                except asyncio.CancelledError:
                    metrics.CANCELLED.inc()
                    log.info("client went away; cancelling")
                    raise
        finally:
            span.set_attributes({"flowkv.tokens.output": gen.num_output, "flowkv.tokens.cached": gen.num_cached,
                                 "flowkv.finish_reason": gen.finish_reason or ""})
            gen.record_stream_span(request_id)


async def _whole(st: GatewayState, req: GenerationRequest, gen: Generation, items: Any, request_id: str) -> web.Response:
    texts: list[str] = []
    lps: list[dict[str, Any]] = []
    async for item in items:
        text, lp = gen.take(item)
        texts.append(text)
        if lp is not None:
            lps.append(lp)
        if gen.finished:
            break
    logprobs = responses.LogprobsBuilder.merge(lps) if req.logprobs is not None else None
    if logprobs is None and req.logprobs is not None:
        logprobs = {"content": []} if req.endpoint.value == "chat" else None
    body = responses.completion(
        req.endpoint, request_id, st.config.served_model_name, responses.now(), "".join(texts), gen.finish_reason, logprobs,
        responses.usage(len(req.prompt_token_ids), gen.num_output, gen.num_cached),
    )
    if req.timing:
        body["flowkv"] = gen.timing()
    return web.json_response(body)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(request: web.Request, st: GatewayState, req: GenerationRequest, gen: Generation, items: Any) -> web.StreamResponse:
    request_id = request[REQUEST_ID]
    model, created = st.config.served_model_name, responses.now()
    # The first delivery comes before the headers, so a rejected placement is still a 429/503.
    first = await anext(items, None)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": request_id})
    await resp.prepare(request)
    st.open_streams.add(resp)
    try:
        if req.endpoint.value == "chat":
            await resp.write(_sse(responses.chunk(req.endpoint, request_id, model, created, "", None, first=True)))
        item = first
        while item is not None:
            text, lp = gen.take(item)
            if text or lp or gen.finished:
                fin = gen.finish_reason if gen.finished else None
                body = responses.chunk(req.endpoint, request_id, model, created, text, fin, lp)
                if gen.finished and req.timing:
                    body["flowkv"] = gen.timing()
                await resp.write(_sse(body))
            if gen.finished:
                break
            item = await anext(items, None)
        if req.include_usage:
            usage = responses.usage(len(req.prompt_token_ids), gen.num_output, gen.num_cached)
            await resp.write(_sse(responses.usage_chunk(req.endpoint, request_id, model, created, usage)))
    except ApiError as exc:
        log.warning("request failed mid-stream: %s", exc.message)
        await resp.write(_sse(exc.body()))
    except ConnectionResetError:
        metrics.CANCELLED.inc()
        log.info("client went away mid-stream; cancelling")
        return resp
    finally:
        st.open_streams.discard(resp)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
