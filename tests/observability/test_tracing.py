"""One request through a real multi-process cluster is one trace: spans from the gateway,
the scheduler, the prefill node and the decode node, all under one trace id, and the
transfer span counts exactly the KV bytes that moved."""

from __future__ import annotations

from libs.engine.model_config import PRESETS
from libs.kvtransfer.layout import KVLayout
from tests.observability.cluster import BLOCK_SIZE, prompt_of, wait_for

TINY = PRESETS["tiny"]
LAYOUT = KVLayout("float32", TINY.num_layers, BLOCK_SIZE, TINY.num_kv_heads, TINY.head_dim)
EXPECTED_SPANS = {"POST /v1/completions", "place", "scheduler.place", "node.prefill", "kv.transfer", "kv.receive",
                  "node.decode", "stream"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


def _request_spans(cluster, request_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    def ready() -> list[dict]:
        spans = [s for s in cluster.spans() if s["attributes"].get("flowkv.request_id") == request_id]
        return spans if EXPECTED_SPANS <= {s["name"] for s in spans} else []

    spans = wait_for(ready)
    assert spans, f"spans of {request_id}: {sorted({s['name'] for s in cluster.spans()})}"
    return spans


def test_one_request_is_one_trace_across_every_service(cluster) -> None:  # type: ignore[no-untyped-def]
    body = cluster.complete(prompt_of(1), max_tokens=4, headers={"X-Request-Id": "trace-one"})
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 4, "total_tokens": 44} | {
        k: v for k, v in body["usage"].items() if k not in ("prompt_tokens", "completion_tokens", "total_tokens")}
    spans = _request_spans(cluster, "trace-one")
    by_name = {s["name"]: s for s in spans}

    assert len({s["trace_id"] for s in spans}) == 1
    assert {s["instance"] for s in spans if s["service"] == "flowkv-node"} == {"p0", "d0"}
    assert {s["service"] for s in spans} == {"flowkv-gateway", "flowkv-scheduler", "flowkv-node"}

    # The tree: root -> place -> scheduler.place; root -> node.prefill and kv.transfer on P;
    # kv.transfer -> kv.receive and node.decode on D; root -> stream.
    root = by_name["POST /v1/completions"]
    assert root["parent_span_id"] is None and root["service"] == "flowkv-gateway"
    parent = {name: s["parent_span_id"] for name, s in by_name.items()}
    ids = {name: s["span_id"] for name, s in by_name.items()}
    assert parent["place"] == ids["POST /v1/completions"]
    assert parent["scheduler.place"] == ids["place"]
    assert parent["node.prefill"] == ids["POST /v1/completions"]
    assert parent["kv.transfer"] == ids["POST /v1/completions"]
    assert parent["kv.receive"] == ids["kv.transfer"]
    assert parent["node.decode"] == ids["kv.transfer"]
    assert parent["stream"] == ids["POST /v1/completions"]
    assert by_name["node.prefill"]["instance"] == "p0" and by_name["kv.transfer"]["instance"] == "p0"
    assert by_name["kv.receive"]["instance"] == "d0" and by_name["node.decode"]["instance"] == "d0"

    # 40 tokens in blocks of 16 on a fresh decode node: 3 blocks move, in one merged call.
    xfer = by_name["kv.transfer"]["attributes"]
    assert LAYOUT.block_bytes == 2 * 2 * 16 * 2 * 16 * 4
    assert xfer["flowkv.kv.blocks"] == 3
    assert xfer["flowkv.kv.bytes"] == 3 * LAYOUT.block_bytes
    assert xfer["flowkv.kv.segments"] == 1
    assert xfer["flowkv.kv.transport"] == "shm"
    assert xfer["flowkv.decode_node"] == "d0"
    recv = by_name["kv.receive"]["attributes"]
    assert (recv["flowkv.kv.bytes"], recv["flowkv.kv.blocks"], recv["flowkv.tokens.cached"]) == (3 * LAYOUT.block_bytes, 3, 0)

    assert root["attributes"]["flowkv.tokens.prompt"] == 40
    assert root["attributes"]["flowkv.tokens.output"] == 4
    assert by_name["stream"]["attributes"]["flowkv.tokens.output"] == 4
    assert by_name["node.prefill"]["attributes"]["flowkv.kv.blocks"] == 3
    sched = by_name["scheduler.place"]["attributes"]
    assert (sched["flowkv.outcome"], sched["flowkv.prefill_node"], sched["flowkv.decode_node"]) == ("disaggregated", "p0", "d0")
    assert all(s["status"] != "ERROR" for s in spans)


def test_an_incoming_traceparent_becomes_the_parent(cluster) -> None:  # type: ignore[no-untyped-def]
    cluster.complete(prompt_of(2), max_tokens=2, headers={"X-Request-Id": "trace-two",
                                                          "traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"})
    spans = _request_spans(cluster, "trace-two")
    assert {s["trace_id"] for s in spans} == {TRACE_ID}
    root = next(s for s in spans if s["name"] == "POST /v1/completions")
    assert root["parent_span_id"] == PARENT_SPAN
