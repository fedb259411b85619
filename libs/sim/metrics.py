"""Metrics of a simulation run: throughput, TTFT/TPOT percentiles, SLO attainment, and
(for clusters of mixed device kinds) the work each kind did."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from libs.protocol.messages import Role
from libs.sim.cluster import Cluster


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 5.0
    tpot_s: float = 0.1


@dataclass
class RunMetrics:
    policy: str
    scenario: str
    num_nodes: int
    num_requests: int
    num_completed: int
    num_dropped: int
    num_rejections: int
    num_flips: int
    throughput_rps: float  # requests completed within the arrival window / window
    throughput_tok_s: float  # their output tokens / window
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tpot_p50: float
    tpot_p90: float
    tpot_p99: float
    slo_attainment: float  # share of all requests that completed within both SLOs
    goodput_rps: float = 0.0  # requests completed within both SLOs / window
    queue_wait_p99: float = 0.0  # the wait in the scheduler's queue of completed requests (SimConfig.queue_wait_s)

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def summarize(cluster: Cluster, policy: str, scenario: str, window_s: float, slo: SLO,
              measure_from_s: float = 0.0) -> RunMetrics:
    """The run's figures over the requests that arrived in ``[measure_from_s, window_s)``
    (a lead-in before it is not measured) and finished by the end of the run (the cluster's
    horizon: the window, or a drain after it); rates are per second of that window."""
    jobs = [j for j in cluster.jobs if measure_from_s <= j.req.arrival < window_s]
    done = [j for j in jobs if 0 <= j.finish_s <= cluster.horizon_s]
    window_s -= measure_from_s
    ttft = [j.first_token_s - j.req.arrival for j in done]
    tpot = [(j.finish_s - j.first_token_s) / (j.req.max_tokens - 1) for j in done if j.req.max_tokens > 1]
    ok = sum(
        1 for j in done
        if j.first_token_s - j.req.arrival <= slo.ttft_s
        and (j.req.max_tokens <= 1 or (j.finish_s - j.first_token_s) / (j.req.max_tokens - 1) <= slo.tpot_s)
    )
    n = len(jobs)
    return RunMetrics(
        policy=policy, scenario=scenario, num_nodes=len(cluster.nodes), num_requests=n, num_completed=len(done),
        num_dropped=sum(1 for j in jobs if j.dropped), num_rejections=cluster.num_rejections,
        num_flips=len(cluster.flips), throughput_rps=len(done) / window_s,
        throughput_tok_s=sum(j.req.max_tokens for j in done) / window_s,
        ttft_p50=percentile(ttft, 50), ttft_p90=percentile(ttft, 90), ttft_p99=percentile(ttft, 99),
        tpot_p50=percentile(tpot, 50), tpot_p90=percentile(tpot, 90), tpot_p99=percentile(tpot, 99),
        slo_attainment=ok / n if n else 0.0, goodput_rps=ok / window_s, queue_wait_p99=percentile([j.queued_s for j in done], 99),
    )


@dataclass(frozen=True)
class DeviceShare:
    """The work the nodes of one device kind did in a run, per node of that kind."""

    device_name: str
    num_nodes: int
    prefill_tokens_per_node: float  # prompt tokens placed on its nodes for prefill (the scheduler's choice)
    output_tokens_per_node: float  # output tokens of requests finished within the window, on their decode node
    prefill_role_share: float  # share of node-time in the prefill role (hybrid counts half)

    @property
    def prefill_tokens_per_prefill_node(self) -> float:
        """Prompt tokens per node of this kind, per run-length in the prefill role (as if the
        node prefilled the whole run); 0 when none of them ever was in that role."""
        return self.prefill_tokens_per_node / self.prefill_role_share if self.prefill_role_share else 0.0


def by_device(cluster: Cluster, window_s: float) -> list[DeviceShare]:
    """Per device kind, in node order: how much prefill work placement gave its nodes, how
    much decode work they finished within the window, and their time in the prefill role."""
    prefill: dict[str, int] = {}
    output: dict[str, int] = {}
    for j in cluster.jobs:
        if j.prefill_node:
            prefill[j.prefill_node] = prefill.get(j.prefill_node, 0) + j.req.num_prompt_tokens
        if 0 <= j.finish_s <= window_s:
            output[j.decode_node] = output.get(j.decode_node, 0) + j.req.max_tokens
    kinds: dict[str, list[str]] = {}
    for nid, node in cluster.nodes.items():
        kinds.setdefault(node.costs.device_name, []).append(nid)
    out = []
    for name, ids in kinds.items():
        role_s = [cluster.role_seconds.get(nid, {}) for nid in ids]
        total = sum(sum(r.values()) for r in role_s)
        p_time = sum(r.get(Role.PREFILL, 0.0) + 0.5 * r.get(Role.HYBRID, 0.0) for r in role_s)
        out.append(DeviceShare(
            device_name=name, num_nodes=len(ids),
            prefill_tokens_per_node=sum(prefill.get(nid, 0) for nid in ids) / len(ids),
            output_tokens_per_node=sum(output.get(nid, 0) for nid in ids) / len(ids),
            prefill_role_share=p_time / total if total else 0.0,
        ))
    return out
