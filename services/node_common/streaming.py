"""Turning engine outputs into ``TokenChunk``s on a gateway's stream subject.

Both handlers stream: the hybrid path (whole generation), the decode path (after a
hand-off) and the recompute paths (P after a failed reservation, D after a failed
transfer). Chunk ``index`` = ``first_index`` + the number of tokens already streamed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping

import msgspec
from nats.aio.client import Client

from libs.engine.outputs import TokenOutput
from libs.engine.sampling import SamplingParams as EngineSamplingParams
from libs.protocol import messages
from libs.protocol.messages import ErrorCode, TokenChunk, TokenLogprob


def engine_params(wire: messages.SamplingParams) -> EngineSamplingParams:
    """The engine's sampling parameters: the wire's own type, re-checked (ValueError when invalid).

    Decoding already validated them; this guards parameters built in-process.
    """
    return EngineSamplingParams(**msgspec.structs.asdict(wire))


def continuation_params(params: EngineSamplingParams) -> EngineSamplingParams:
    """Parameters to generate the rest of a request whose first token already exists.

    Used when a prompt is recomputed with its first output token appended: one token
    fewer to go, one fewer before EOS may end it.
    """
    return msgspec.structs.replace(
        params, max_tokens=max(1, params.max_tokens - 1), min_tokens=max(0, params.min_tokens - 1)
    )


def prior_outputs(num_prompt_tokens: int, submitted_prompt_tokens: int, num_original_prompt_tokens: int) -> dict[str, int]:
    """Keyword arguments telling the engine how many of a prompt's last tokens are earlier output.

    A retry submits the original prompt + the tokens the client already has, and a
    recompute appends the first token to that: the seeds, the penalties and the grammar
    must go on after those tokens, not start over. Empty when there are none, so an engine
    that cannot take them is called as for a fresh request.

    Args:
        num_prompt_tokens: the prompt handed to the engine.
        submitted_prompt_tokens: the prompt of the request as submitted to the node.
        num_original_prompt_tokens: the client's prompt (0: the submitted one).
    """
    n = num_prompt_tokens - (num_original_prompt_tokens or submitted_prompt_tokens)
    return {"num_prior_output_tokens": n} if n > 0 else {}


def wire_logprobs(out: TokenOutput) -> list[TokenLogprob] | None:
    if out.logprobs is None:
        return None
    return list(out.logprobs)


@dataclasses.dataclass
class Usage:
    """What the last chunk reports: the client's prompt length and the node's cache hits."""

    num_prompt_tokens: int
    num_cached_tokens: int = 0
    from_engine: bool = True  # take num_cached_tokens from the engine's outputs


def chunk_of(out: TokenOutput, node_id: str, index: int, usage: Usage) -> TokenChunk:
    """The ``TokenChunk`` carrying one engine output."""
    code = None
    if out.finish_reason == "error":
        code = ErrorCode.INVALID if out.error else ErrorCode.INTERNAL
    elif out.finish_reason == "abort":
        code = ErrorCode.CANCELLED
    return TokenChunk(
        request_id=out.request_id, node_id=node_id, index=index, token_ids=list(out.token_ids), text=out.text,
        logprobs=wire_logprobs(out), finished=out.finished and out.finish_reason is not None,
        finish_reason=out.finish_reason, num_prompt_tokens=usage.num_prompt_tokens,
        num_cached_tokens=usage.num_cached_tokens, code=code, error=out.error or "", prefill_s=out.prefill_s,
    )


def error_chunk(request_id: str, node_id: str, index: int, code: ErrorCode, error: str) -> TokenChunk:
    """A final chunk without tokens that tells the gateway why the request ended."""
    return TokenChunk(request_id=request_id, node_id=node_id, index=index, token_ids=[], finished=True,
                      finish_reason="error", code=code, error=error)


class Streamer:
    """Publishes a request's chunks to its reply subject, carrying the request's NATS headers."""

    def __init__(self, nc: Client, node_id: str, reply_subject: str, headers: Mapping[str, str] | None) -> None:
        self.nc = nc
        self.node_id = node_id
        self.reply_subject = reply_subject
        self.headers = dict(headers) if headers else None

    async def publish(self, chunk: TokenChunk) -> None:
        await self.nc.publish(self.reply_subject, messages.encode(chunk), headers=self.headers)

    async def stream(self, outputs: AsyncIterator[TokenOutput], first_index: int, usage: Usage) -> TokenOutput | None:
        """Publish every output of ``outputs``; returns the last one (None if there was none).

        ``usage.num_cached_tokens`` is taken from the engine's outputs when it reports one.
        """
        index = first_index
        last: TokenOutput | None = None
        async for out in outputs:
            if usage.from_engine and out.num_cached_tokens:
                usage.num_cached_tokens = out.num_cached_tokens
            if out.token_ids or (out.finished and out.finish_reason is not None):
                await self.publish(chunk_of(out, self.node_id, index, usage))
            index += len(out.token_ids)
            last = out
        return last
