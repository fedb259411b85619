"""Prometheus metrics of the gateway (``flowkv_gateway_*``), served on ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter(
    "flowkv_gateway_requests_total", "HTTP requests answered, by endpoint and status", ["endpoint", "status"]
)
IN_FLIGHT = Gauge("flowkv_gateway_requests_in_flight", "generation requests admitted and not finished")
QUEUED_TOKENS = Gauge("flowkv_gateway_queued_prompt_tokens", "prompt tokens of the requests in flight")
TTFT = Histogram(
    "flowkv_gateway_time_to_first_token_seconds", "request arrival to first output token", buckets=_LATENCY_BUCKETS
)
TPOT = Histogram(
    "flowkv_gateway_time_per_output_token_seconds", "mean time between output tokens after the first, per request",
    buckets=_TPOT_BUCKETS,
)
CONTROL_PLANE = Histogram(
    "flowkv_gateway_control_plane_seconds",
    "request arrival to first token received, minus the engine's own prefill time (TokenChunk.prefill_s) and the wait in the scheduler's queue",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0),
)
QUEUED_SECONDS = Histogram(
    "flowkv_gateway_scheduler_queue_seconds", "wait in the scheduler's queue of the requests that waited (Placement.queued_s)",
    buckets=_LATENCY_BUCKETS,
)
E2E = Histogram("flowkv_gateway_e2e_request_latency_seconds", "request arrival to its last token", buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("flowkv_gateway_prompt_tokens_total", "prompt tokens of finished requests")
GENERATION_TOKENS = Counter("flowkv_gateway_generation_tokens_total", "output tokens sent to clients")
SLOW_WAITS = Counter(
    "flowkv_gateway_slow_waits_total",
    "stall timeouts that did not re-place the request because its node was alive and busy",
)
RETRIES = Counter("flowkv_gateway_retries_total", "re-placements after a node failure, by reason", ["reason"])
REJECTED = Counter("flowkv_gateway_rejected_total", "requests refused before reaching a node, by reason", ["reason"])
CANCELLED = Counter("flowkv_gateway_cancelled_total", "requests ended by the client before they finished")
