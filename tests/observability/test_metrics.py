"""Scrape ``/metrics`` of the gateway, the scheduler and both nodes before and after N
requests: the counters move by exactly what the requests did."""

from __future__ import annotations

from services.cli.plan import plan_cluster
from services.cli.up import UpConfig
from tests.observability.cluster import NUM_BLOCKS, prompt_of, sample, wait_for
from tests.observability.test_tracing import LAYOUT

N = 3
MAX_TOKENS = 5
PROMPT_LEN = 40  # 3 blocks of 16


def test_counters_move_by_exactly_the_requests(cluster) -> None:  # type: ignore[no-untyped-def]
    services = ("gateway", "scheduler", "p0", "d0")
    before = {name: cluster.scrape(name) for name in services}
    for k in range(N):
        body = cluster.complete(prompt_of(100 + k, PROMPT_LEN), max_tokens=MAX_TOKENS)
        assert body["usage"]["completion_tokens"] == MAX_TOKENS

    def delta(name: str, metric: str, **labels: str) -> float:
        return sample(cluster.scrape(name), metric, **labels) - sample(before[name], metric, **labels)

    # The decode node counts a request once its last chunk is out: wait until it has.
    assert wait_for(lambda: delta("d0", "flowkv_node_requests_total", phase="decode", outcome="ok") == N)

    gw = {"endpoint": "/v1/completions", "status": "200"}
    assert delta("gateway", "flowkv_gateway_requests_total", **gw) == N
    assert delta("gateway", "flowkv_gateway_generation_tokens_total") == N * MAX_TOKENS
    assert delta("gateway", "flowkv_gateway_prompt_tokens_total") == N * PROMPT_LEN
    assert delta("gateway", "flowkv_gateway_time_to_first_token_seconds_count") == N
    assert delta("gateway", "flowkv_gateway_e2e_request_latency_seconds_count") == N
    assert delta("gateway", "flowkv_gateway_time_per_output_token_seconds_count") == N
    assert sample(cluster.scrape("gateway"), "flowkv_gateway_requests_in_flight") == 0

    assert delta("scheduler", "flowkv_scheduler_placements_total", policy="flowkv", outcome="disaggregated") == N
    assert delta("scheduler", "flowkv_scheduler_place_seconds_count") == N
    sched = cluster.scrape("scheduler")
    assert sample(sched, "flowkv_scheduler_nodes", role="prefill", state="ready") == 1
    assert sample(sched, "flowkv_scheduler_nodes", role="decode", state="ready") == 1
    assert sample(sched, "flowkv_scheduler_nodes", role="hybrid", state="ready") == 0

    moved = N * 3 * LAYOUT.block_bytes  # fresh prompts: every block moves
    assert delta("p0", "flowkv_node_requests_total", phase="prefill", outcome="ok") == N
    assert delta("p0", "flowkv_node_kv_transfers_total", transport="shm") == N
    assert delta("p0", "flowkv_node_kv_transfer_bytes_total", transport="shm") == moved
    assert delta("p0", "flowkv_node_kv_transfer_calls_total", transport="shm") == N  # one merged call each
    assert delta("p0", "flowkv_node_kv_transfer_seconds_count", transport="shm") == N
    assert delta("d0", "flowkv_node_kv_received_total", transport="shm") == N
    assert delta("d0", "flowkv_node_kv_received_bytes_total", transport="shm") == moved

    d0 = cluster.scrape("d0")
    assert sample(d0, "flowkv_node_kv_blocks_total") == NUM_BLOCKS
    assert sample(d0, "flowkv_node_kv_blocks_free") + sample(d0, "flowkv_node_kv_blocks_used") == NUM_BLOCKS
    assert sample(d0, "flowkv_node_role", role="decode") == 1
    assert sample(d0, "flowkv_node_role", role="prefill") == 0
    assert 0 <= sample(d0, "flowkv_node_kv_fragmentation_ratio") < 1


def test_flowkv_up_gives_the_scheduler_and_every_node_a_metrics_port() -> None:
    plan = plan_cluster(UpConfig(model="tiny", port=8100, prefill_nodes=1, decode_nodes=2, nats_url="nats://x:4222"))
    ports = {c.name: c.argv[c.argv.index("--metrics-port") + 1] for c in plan.children if "--metrics-port" in c.argv}
    assert ports == {"scheduler": "8101", "prefill-0": "8102", "decode-0": "8103", "decode-1": "8104"}
    assert plan.metrics_urls == {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()}
