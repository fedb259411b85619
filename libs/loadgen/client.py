"""One streamed request against the OpenAI API, timed chunk by chunk (aiohttp, SSE).

Life of a request:

1. POST the body with ``stream: true`` and ``stream_options.include_usage`` (the exact
   token counts come from the final usage chunk);
2. a non-200 answer is a failure recorded with its status and the error message;
3. each ``data:`` event with output text is a token arrival: the first sets TTFT, the
   others add an ITL gap; an ``error`` event is a failure mid-stream;
4. ``data: [DONE]`` (or the end of the body) sets E2E.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from libs.loadgen.metrics import RequestRecord
from libs.loadgen.workloads import RequestSpec

# Short common English words, about one token each in Llama-family tokenizers; chat
# prompts are text, so their lengths are approximate (the usage chunk gives the truth).
_WORDS = ("the of and to in is that for it as was with on be at by this had not are but from or have an they which "
          "one you were all we her she there would their will when who him been has more if no out do so can what up "
          "said about other into than its time only could new them man some these then two first may any like now my "
          "such make over our even most me state after also made many did must before back see through way where get "
          "much go well your know should down work year because come people just say each those take day good how "
          "long little use very great still own life men here old both between under last never another while").split()


@dataclass(frozen=True)
class ClientOptions:
    """How requests are sent.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000`` (``/v1/...`` is appended).
        model: the model name the server serves.
        endpoint: ``completions`` (token-id prompts, exact lengths) or ``chat``.
        api_key: sent as ``Authorization: Bearer``; empty sends none.
        ignore_eos: ask for exactly ``output_len`` tokens (vLLM's extension, also FlowKV's).
        temperature: sampling temperature (0: greedy).
        server_timing: ask the gateway for its ``flowkv`` timing extension.
        timeout_s: the whole request's limit.
    """

    base_url: str
    model: str
    endpoint: str = "completions"
    api_key: str = ""
    ignore_eos: bool = True
    temperature: float = 0.0
    server_timing: bool = False
    timeout_s: float = 600.0

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        return self.base_url.rstrip("/") + path


def request_body(spec: RequestSpec, opts: ClientOptions) -> dict[str, Any]:
    """The JSON body for ``spec`` on the chosen endpoint."""
    body: dict[str, Any] = {
        "model": opts.model, "stream": True, "stream_options": {"include_usage": True},
        "temperature": opts.temperature,
    }
    if opts.ignore_eos:
        body["ignore_eos"] = True
    if opts.server_timing:
        body["flowkv_timing"] = True
    if opts.endpoint == "chat":
        text = " ".join(_WORDS[t % len(_WORDS)] for t in spec.prompt_token_ids)
        body["messages"] = [{"role": "user", "content": text}]
        body["max_completion_tokens"] = spec.output_len
    else:
        body["prompt"] = spec.prompt_token_ids
        body["max_tokens"] = spec.output_len
    return body


def _text_of(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "delta" in c:
        return c["delta"].get("content") or ""
    return c.get("text") or ""


async def send(session: aiohttp.ClientSession, spec: RequestSpec, opts: ClientOptions, t0: float) -> RequestRecord:
    """Send one request and time it.

    Args:
        session: the shared HTTP session.
        spec: what to send.
        opts: where and how.
        t0: ``time.perf_counter()`` of the run's start (records' ``start`` is relative to it).

    Returns:
        The request's record; failures are recorded, never raised.
    """
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    start = time.perf_counter()
    rec = RequestRecord(index=spec.index, start=start - t0, prompt_tokens=spec.input_len)
    chunks = 0
    last = start
    try:
        async with session.post(opts.url, json=request_body(spec, opts), headers=headers,
                                timeout=aiohttp.ClientTimeout(total=opts.timeout_s)) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = (await resp.text())[:500] or resp.reason or "error"
                return rec
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    rec.error = str(event["error"].get("message", event["error"]))
                    break
                now = time.perf_counter()
                if _text_of(event):
                    if chunks == 0:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    chunks += 1
                    last = now
                if event.get("usage"):
                    rec.output_tokens = int(event["usage"].get("completion_tokens", 0))
                    rec.prompt_tokens = int(event["usage"].get("prompt_tokens", rec.prompt_tokens))
                if "flowkv" in event:
                    rec.server_timing = event["flowkv"]
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    rec.e2e = time.perf_counter() - start
    if rec.output_tokens == 0:
        rec.output_tokens = chunks  # no usage chunk: one token per chunk is the best guess
    if not rec.error and chunks == 0:
        rec.error = "no output"
    return rec
