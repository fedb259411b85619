"""Schemathesis against a real gateway: no 5xx and no hang on any generated request.

The request schemas in that document are generated from the Structs the gateway decodes
bodies into, so every field of the API is fuzzed: sampling and penalties, ``n`` and
``best_of``, batches of prompts, ``response_format`` and the guided-decoding fields,
``tools`` and ``tool_choice``, and the ``/tokenize`` and ``/detokenize`` bodies.

The cluster is real: a nats-server, the scheduler, one hybrid node with the ``tiny``
preset and the gateway, each its own process. Schemathesis reads the OpenAPI document the
gateway serves on ``/openapi.json`` and generates, per operation, bodies that follow it
(positive: they must be served) and bodies that break it (negative: they must be refused
with a 4xx). Every call has a timeout, so a hang fails the test as surely as a 500.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from services.common.natsserver import free_port
from tests.fuzz.procs import Cluster

CALL_TIMEOUT_S = 20.0  # a tiny-model generation of <= 2048 tokens takes a few seconds here
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 25}
FUZZ_SEED = 20260101


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("fuzz-cluster"))
    try:
        cluster.start_nats("127.0.0.1", free_port())
        # One node: the role controller must not flip it (it would leave no prefill or no decode side).
        cluster.start_scheduler("--min-dwell-s", "3600")
        cluster.start_node("hybrid-0", "hybrid")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cluster.start_gateway(port, "--stall-timeout-s", "10")
        cluster.wait_ready(url, {"hybrid-0"})
        yield url
        assert cluster.dead() == [], cluster.tails()
    finally:
        cluster.stop()


def _fuzz(case_strategy, base_url: str, mode: GenerationMode, seen: list[int]) -> None:
    @seed(FUZZ_SEED)
    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=case_strategy)
    def run(case) -> None:  # type: ignore[no-untyped-def]
        try:
            response = case.call(base_url=base_url, timeout=CALL_TIMEOUT_S)
        except requests.Timeout:
            pytest.fail(f"no answer in {CALL_TIMEOUT_S}s (hang) to {case.method} {case.path} body={case.body!r}")
        seen.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        if mode is GenerationMode.NEGATIVE and response.status_code < 400:
            pytest.fail(f"a body that breaks the schema was served {response.status_code}: "
                        f"{case.method} {case.path} body={case.body!r}")

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_server_error_or_hang_on_any_operation(gateway_url, mode) -> None:
    schema = schemathesis.openapi.from_url(gateway_url + "/openapi.json")
    statuses: dict[str, list[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # no parameters and no body: nothing can break the schema
        seen = statuses.setdefault(operation.label, [])
        _fuzz(operation.as_strategy(generation_mode=mode), gateway_url, mode, seen)
    # Every operation was exercised, and generation did get through (positive) or got refused (negative).
    gets = {"GET /v1/models", "GET /health", "GET /ready", "GET /metrics"} if mode is GenerationMode.POSITIVE else set()
    assert set(statuses) == {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize",
                             "POST /detokenize"} | gets
    print({label: sorted(seen) for label, seen in statuses.items()})
    assert all(statuses.values())
    generation = statuses["POST /v1/completions"] + statuses["POST /v1/chat/completions"]
    if mode is GenerationMode.POSITIVE:
        assert 200 in generation
    else:
        assert all(400 <= s < 500 for s in generation), sorted(set(generation))
