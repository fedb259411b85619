"""HTTP handlers of the OpenAI endpoints: /v1/models, /v1/completions, /v1/chat/completions.

A generation request is served by the model its ``model`` field names: that model's
tokenizer and chat template, its context length, and its nodes (the placement asks the
scheduler for a node of that model).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from aiohttp import web
from opentelemetry.trace import Span, SpanKind

from services.common.tracing import extract_context, tracer
from services.gateway import fanout, metrics, responses, tools
from services.gateway.errors import ApiError
from services.gateway.schemas import Endpoint, GenerationRequest, parse_chat, parse_completion, tokenize
from services.gateway.tools import ToolMode
from services.gateway.state import REQUEST_ID, STATE, GatewayState
from services.gateway.tokenizer import ServedModel

log = logging.getLogger(__name__)

_INLINE_TOKENIZE_CHARS = 4096  # longer prompts are tokenized off the event loop
_TRACER = tracer("flowkv.gateway")


async def models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    cards = [{"id": m.name, "object": "model", "created": st.created, "owned_by": "flowkv",
              "max_model_len": m.tokenizer.max_model_len} for m in st.models.values()]
    return web.json_response({"object": "list", "data": cards})


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_completion)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_chat)


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The raw request body; 413 past ``max_bytes``."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large") from None


async def _serve(request: web.Request, parse: Callable[[Any, Collection[str]], GenerationRequest]) -> web.StreamResponse:
    # The request's trace: a root span, or a child of the client's own traceparent header.
    parent = extract_context({k.lower(): v for k, v in request.headers.items()})
    with _TRACER.start_as_current_span(f"{request.method} {request.path}", context=parent, kind=SpanKind.SERVER) as span:
        span.set_attribute("flowkv.request_id", request[REQUEST_ID])
        return await _serve_traced(request, parse, span)


async def _serve_traced(request: web.Request, parse: Callable[[Any, Collection[str]], GenerationRequest],
                        span: Span) -> web.StreamResponse:
    started = time.monotonic()
    st = request.app[STATE]
    if st.stopping:
        raise ApiError(503, "the gateway is shutting down", type="server_error", code="shutting_down")
    req = parse(await read_body(request, st.config.max_body_bytes), st.models.keys())
    sm = st.served(req.model)  # the model the request names: its tokenizer, limits and nodes
    if sum(len(p.text or "") for p in req.prompts) > _INLINE_TOKENIZE_CHARS or req.messages:
        await asyncio.to_thread(tokenize, req, sm.tokenizer)
    else:
        tokenize(req, sm.tokenizer)
    request_id = request[REQUEST_ID]
    cands = fanout.candidates(req, request_id, sm.model, sm.tokenizer.tokenizer, started)
    with contextlib.ExitStack() as admitted:
        for c in cands:
            admitted.enter_context(st.admission.admit(len(c.job.prompt_token_ids)))
        span.set_attribute("flowkv.tokens.prompt", sum(len(p.token_ids) for p in req.prompts))
        try:
            async with fanout.FanOut(st.dispatcher, cands) as run:
                try:
                    if req.stream:
                        return await _stream(request, st, sm, req, cands, run.outputs())
                    return await _whole(sm, req, cands, run.outputs(), request_id)
                except asyncio.CancelledError:
                    metrics.CANCELLED.inc()
                    log.info("client went away; cancelling")
                    raise
        finally:
            gens = [c.gen for c in cands]
            span.set_attributes({"flowkv.tokens.output": sum(g.num_output for g in gens),
                                 "flowkv.tokens.cached": max(g.num_cached for g in gens),
                                 "flowkv.finish_reason": gens[0].finish_reason or ""})
            for g in gens:
                g.record_stream_span(request_id)


def _usage(req: GenerationRequest, returned: list[fanout.Candidate]) -> dict[str, Any]:
    """Prompt tokens once per prompt; completion tokens of the returned choices; per prompt the
    most cached tokens any of its candidates had."""
    cached: dict[int, int] = {}
    for c in returned:
        cached[c.prompt] = max(cached.get(c.prompt, 0), c.gen.num_cached)
    return responses.usage(sum(len(p.token_ids) for p in req.prompts), sum(c.gen.num_output for c in returned),
                           sum(cached.values()))


def _echo_text(req: GenerationRequest, tok: Any, prompt: int) -> str:
    p = req.prompts[prompt]
    return p.text if p.text is not None else tok.decode(p.token_ids, skip_special_tokens=False,
                                                        clean_up_tokenization_spaces=False)


async def _whole(sm: ServedModel, req: GenerationRequest, cands: list[fanout.Candidate], outputs: Any,
                 request_id: str) -> web.Response:
    texts: dict[int, list[str]] = {c.key: [] for c in cands}
    lps: dict[int, list[dict[str, Any]]] = {c.key: [] for c in cands}
    async for out in outputs:
        texts[out.candidate.key].append(out.text)
        if out.logprobs is not None:
            lps[out.candidate.key].append(out.logprobs)
    returned = fanout.rank(req, cands)
    choices = []
    for c in returned:
        text = "".join(texts[c.key])
        logprobs = responses.LogprobsBuilder.merge(lps[c.key]) if req.logprobs is not None else None
        if logprobs is None and req.logprobs is not None:
            logprobs = {"content": []} if req.endpoint is Endpoint.CHAT else None
        finish, calls = c.gen.finish_reason, None
        content: str | None = text
        if req.tools is not None and req.tools.mode is not ToolMode.NONE:
            content, calls = tools.parse_calls(req.tools, text)
            if calls and finish != "length":
                finish = "tool_calls"
        if req.echo:
            content = _echo_text(req, sm.tokenizer.tokenizer, c.prompt) + text
        choices.append(responses.choice(req.endpoint, c.index, content, finish, logprobs, calls or None))
    body = responses.whole(req.endpoint, request_id, sm.name, responses.now(), choices,
                           _usage(req, returned))
    if req.timing:
        body["flowkv"] = cands[0].gen.timing()
    return web.json_response(body)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(request: web.Request, st: GatewayState, sm: ServedModel, req: GenerationRequest,
                  cands: list[fanout.Candidate], outputs: Any) -> web.StreamResponse:
    request_id = request[REQUEST_ID]
    model, created = sm.name, responses.now()
    # The first output comes before the headers, so a rejected placement is still a 429/503.
    first = await anext(outputs, None)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": request_id})
    await resp.prepare(request)
    st.open_streams.add(resp)
    spec = req.tools if req.tools is not None and req.tools.mode is not ToolMode.NONE else None
    readers = {c.key: tools.ToolStream(spec) for c in cands} if spec is not None else {}

    def chunk(c: fanout.Candidate, text: str | None, finish: str | None, lp: Any = None, **kw: Any) -> bytes:
        body = responses.chunk(req.endpoint, request_id, model, created, text, finish, lp, index=c.index, **kw)
        if finish is not None and req.timing:
            body["flowkv"] = c.gen.timing()
        return _sse(body)

    try:
        for c in cands:  # the opening chunk of every choice: the role (chat), the prompt (echo)
            if req.endpoint is Endpoint.CHAT:
                await resp.write(chunk(c, "", None, first=True))
            elif req.echo:
                await resp.write(chunk(c, _echo_text(req, sm.tokenizer.tokenizer, c.prompt), None))
        out = first
        while out is not None:
            c = out.candidate
            if c.key in readers:
                await _write_tool_deltas(resp, chunk, readers[c.key], out)
            elif out.text or out.logprobs or out.finished:
                await resp.write(chunk(c, out.text, c.gen.finish_reason if out.finished else None, out.logprobs))
            out = await anext(outputs, None)
        if req.include_usage:
            usage = _usage(req, cands)
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


async def _write_tool_deltas(resp: web.StreamResponse, chunk: Callable[..., bytes], reader: tools.ToolStream,
                             out: fanout.Output) -> None:
    """A chat choice whose output is read for tool calls: its deltas, the logprobs on the first."""
    c, lp = out.candidate, out.logprobs
    deltas = reader.feed(out.text) + (reader.finish() if out.finished else [])
    for d in deltas:
        await resp.write(chunk(c, None, None, lp, delta=d))
        lp = None
    if lp:
        await resp.write(chunk(c, None, None, lp, delta={}))
    if out.finished:
        finish = c.gen.finish_reason
        if reader.called and finish != "length":
            finish = "tool_calls"
        await resp.write(chunk(c, None, finish, delta={}))
