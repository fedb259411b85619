"""The engine's per-request prefill time travels on the first token: engine -> TokenChunk."""

from __future__ import annotations

from libs.engine.sampling import SamplingParams
from services.node_common.streaming import Usage, chunk_of
from tests.engine.conftest import make_engine, run_all

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_prefill_s_is_on_the_first_token_only_and_reaches_the_chunk() -> None:
    engine = make_engine(max_num_batched_tokens=8)  # 19-token prompt: three prefill chunks
    outs = run_all(engine, {"a": list(range(100, 119)), "b": list(range(200, 205))}, PARAMS)
    for rid in ("a", "b"):
        with_tokens = [o for o in outs[rid] if o.token_ids]
        assert len(with_tokens) == 4
        assert with_tokens[0].prefill_s > 0
        assert [o.prefill_s for o in with_tokens[1:]] == [0.0, 0.0, 0.0]
    chunk = chunk_of(outs["a"][0], "n0", 0, Usage(num_prompt_tokens=19))
    assert chunk.prefill_s == outs["a"][0].prefill_s


def test_prefill_only_request_reports_its_prefill_time() -> None:
    engine = make_engine()
    engine.add_request("p", list(range(50, 60)), PARAMS, prefill_only=True)
    outs = []
    while engine.has_work():
        outs.extend(engine.step())
    assert [o.prefilled for o in outs] == [True]
    assert outs[0].prefill_s > 0
