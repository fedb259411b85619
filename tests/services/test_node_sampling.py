"""Penalties, min_p and structured output over NATS: 1P1D, colocated and recomputed give one output.

The test plays the gateway (SubmitRequest in, TokenChunks out) against real nodes on a
real nats-server. The prefill node samples the first token under the request's penalties
and grammar; the decode node must continue from exactly that state.
"""

from __future__ import annotations

import json
import re

import jsonschema
import nats
import pytest
import torch

from libs.engine.config import EngineConfig
from libs.engine.engine import LLMEngine
from libs.kvtransfer.base import TransferError
from libs.protocol.messages import ErrorCode, Role, SamplingParams, StructuredOutput
from tests.services.test_node import BLOCKS, BS, PROMPT, Gateway, eventually, idle, reference, running_node, tokens

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["x", "y", "z"]}},
    "required": ["id", "tag"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{3,5}-[0-9]{2}"
CASES = {
    "penalties": SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, presence_penalty=2.0,
                                frequency_penalty=1.5, repetition_penalty=1.7, logit_bias={11: 8.0}),
    "seeded": SamplingParams(max_tokens=10, temperature=1.0, seed=4, ignore_eos=True, min_p=0.1,
                             frequency_penalty=2.0),
    "json_schema": SamplingParams(max_tokens=40, temperature=1.0, seed=8,
                                  structured=StructuredOutput(json_schema=json.dumps(SCHEMA))),
    "regex": SamplingParams(max_tokens=40, temperature=0.0, structured=StructuredOutput(regex=REGEX)),
}


@pytest.fixture(scope="module")
def engines():
    torch.set_num_threads(2)
    make = lambda: LLMEngine(EngineConfig(model="tiny", num_blocks=BLOCKS, block_size=BS, shared_pool=True))  # noqa: E731
    p, d = make(), make()
    refs = {name: reference(p, PROMPT, params) for name, params in CASES.items()}
    yield p, d, refs
    p.pool.close()
    d.pool.close()


def _check(name: str, text: str) -> None:
    if name == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif name == "regex":
        assert re.fullmatch(REGEX, text), text


async def test_one_output_in_every_shape(nats_server, engines):
    p_llm, d_llm, refs = engines
    tokenizer = p_llm.tokenizer
    async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL) as p, \
            running_node(nats_server.url, d_llm, "d0", Role.DECODE) as d:
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        for name, params in CASES.items():
            assert (await gw.submit("p0", f"pd-{name}", decode_node="d0", params=params)).ok
            chunks = await gw.result(f"pd-{name}")
            assert tokens(chunks) == refs[name], name
            assert chunks[0].node_id == "p0" and {c.node_id for c in chunks[1:]} <= {"d0"}, name
            _check(name, tokenizer.decode(tokens(chunks)))
            if name in ("json_schema", "regex"):
                assert chunks[-1].finish_reason == "stop", name
            # Colocated: the prefill node is its own decode node.
            assert (await gw.submit("p0", f"co-{name}", decode_node="p0", params=params)).ok
            assert tokens(await gw.result(f"co-{name}")) == refs[name], name
        await eventually(lambda: idle(p, d), "blocks free on both nodes")

        async def broken_send(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise TransferError("link down")

        # A failed transfer: D recomputes prompt + first token, which it must treat as output.
        p.agent.send = broken_send
        for name, params in CASES.items():
            assert (await gw.submit("p0", f"rc-{name}", decode_node="d0", params=params)).ok
            chunks = await gw.result(f"rc-{name}")
            assert [c.node_id for c in chunks][:2] == ["p0", "d0"], name
            assert tokens(chunks) == refs[name], name
        await eventually(lambda: idle(p, d), "blocks free on both nodes")
        await gw.nc.drain()


async def test_bad_spec_is_refused_as_invalid(nats_server, engines):
    p_llm, d_llm, _ = engines
    async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL) as p, \
            running_node(nats_server.url, d_llm, "d0", Role.DECODE) as d:
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        for i, spec in enumerate([StructuredOutput(regex="(unclosed"), StructuredOutput(json_schema="[1, 2")]):
            params = SamplingParams(max_tokens=8, structured=spec)
            await gw.submit("p0", f"bad{i}", decode_node="d0", params=params)
            chunks = await gw.result(f"bad{i}")
            assert chunks[-1].finish_reason == "error" and chunks[-1].code is ErrorCode.INVALID
            assert "invalid structured output" in chunks[-1].error
        # The nodes still serve.
        assert (await gw.submit("p0", "after", decode_node="d0", params=CASES["regex"])).ok
        _check("regex", p_llm.tokenizer.decode(tokens(await gw.result("after"))))
        await eventually(lambda: idle(p, d), "blocks free on both nodes")
        await gw.nc.drain()
