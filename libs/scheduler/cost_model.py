"""The cost model behind placement: predicted TTFT of a (P, D) pair and decode load of D.

For a request on prefill node P handing off to decode node D:

  TTFT(P, D) = queued prefill tokens of P / rate(P)          (its backlog)
             + (prompt tokens - P's cached prefix) / rate(P)  (this prompt)
             + latency(P, D)
             + KV blocks x kv_block_bytes / bandwidth(P, D)   (the hand-off; 0 when P == D)

``rate`` is the measured prefill tokens/s of the node's device kind (a default before
any prefill), so nodes of different device kinds are weighed by what they actually do.
Likewise ``bandwidth`` and ``latency`` are what P's own hand-offs to D measured (``kv_links`` of
P's load report) once P has sent D anything, and a planning figure of the pair's
transport class before. D is scored by its decode load (sequences x step time) and must
have room for the request's KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from libs.protocol.messages import KVLink, PlaceRequest
from libs.scheduler.node_registry import NodeEntry

GB = 1e9


@dataclass(frozen=True)
class CostModel:
    """Defaults used until a node reports measured figures.

    Bandwidths are per transport class: same-host GPU (CUDA IPC over NVLink; 367 GiB/s
    was measured here, 300 GB/s is the planning figure), same-host CPU shared memory,
    cross-host NCCL, and TCP. They and ``transfer_latency_s`` stand in for a pair until
    the prefill node reports a measured link to that decode node.
    """

    default_prefill_tokens_per_s: float = 8000.0
    default_decode_step_s: float = 0.02
    bw_same_host_gpu: float = 300 * GB
    bw_shm: float = 5 * GB
    bw_nccl: float = 12.5 * GB
    bw_tcp: float = 1 * GB
    transfer_latency_s: float = 0.001

    def prefill_rate(self, node: NodeEntry) -> float:
        """The node's prefill tokens/s: the mean measured rate of its device kind; its own
        while no node of its kind has reported one; the default before any prefill.

        A node's own rate is an average over its recent steps, and a step's tokens/s
        depends on its mix (one short prompt, or a full chunk deep into a long one): on
        4 x H100, two prefill nodes reported 26k and 21k tok/s, and placement by those
        sent a 16k-token prompt to the one with 7k tokens queued rather than 4k. Nodes
        of one kind are equally fast; the kind's mean keeps the real difference between
        kinds (an H100 still takes about twice an A100's prompts) and rates a node
        flipped from decode, which has not prefilled yet, as its kind."""
        for rate in (node.kind_prefill_rate, node.report.prefill_tokens_per_s):
            if rate > 0:
                return rate
        return self.default_prefill_tokens_per_s

    def decode_step_s(self, node: NodeEntry) -> float:
        step = node.report.decode_step_s
        return step if step > 0 else self.default_decode_step_s

    def measured_link(self, p: NodeEntry, d: NodeEntry) -> KVLink | None:
        """What ``p``'s hand-offs to ``d`` measured, or None before the first one."""
        link = p.kv_links.get(d.node_id)
        if link is None or link.transfers < 1 or not link.bandwidth_bytes_per_s > 0:
            return None
        return link

    def bandwidth(self, p: NodeEntry, d: NodeEntry) -> float:
        """Bytes/s of a KV hand-off from ``p`` to ``d`` (``inf`` when they are one node):
        the pair's measured figure, else the planning figure of its transport class."""
        if p.node_id == d.node_id:
            return math.inf
        return self._link_figures(p, d)[1]

    def _link_figures(self, p: NodeEntry, d: NodeEntry) -> tuple[float, float]:
        """(latency s, bandwidth bytes/s) of ``p`` -> ``d``: measured, else planned."""
        link = self.measured_link(p, d)
        if link is not None:
            return link.latency_s, link.bandwidth_bytes_per_s
        return self.transfer_latency_s, self._class_bandwidth(p, d)

    def _class_bandwidth(self, p: NodeEntry, d: NodeEntry) -> float:
        """The planning figure of the pair's transport class."""
        pr, dr = p.report, d.report
        both_gpu = pr.device.startswith("cuda") and dr.device.startswith("cuda")
        if pr.host_id and pr.host_id == dr.host_id:
            return self.bw_same_host_gpu if both_gpu else self.bw_shm
        if both_gpu and "nccl" in pr.kv_transports and "nccl" in dr.kv_transports:
            return self.bw_nccl
        return self.bw_tcp

    def transfer_s(self, p: NodeEntry, d: NodeEntry, blocks: int) -> float:
        """Predicted seconds to hand ``blocks`` KV blocks from ``p`` to ``d`` (0 on one node)."""
        if p.node_id == d.node_id or blocks <= 0:
            return 0.0
        latency, bandwidth = self._link_figures(p, d)
        return latency + blocks * p.report.kv_block_bytes / bandwidth


def cached_prefix_blocks(prefix_hashes: list[int], cached: frozenset[int]) -> int:
    """Leading blocks of the prompt found in a node's prefix cache.

    The hashes are chained (each covers the whole prefix up to its block), so the hit is
    the run of matches from the start; a match after a miss is a different prefix.
    """
    n = 0
    for h in prefix_hashes:
        if h not in cached:
            break
        n += 1
    return n


def prompt_blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // max(block_size, 1))


@dataclass(frozen=True)
class Estimate:
    """What the cost model predicts for one (P, D) pair."""

    ttft_s: float
    uncached_tokens: int
    transfer_blocks: int


def estimate(model: CostModel, req: PlaceRequest, p: NodeEntry, d: NodeEntry) -> Estimate:
    """Predicted TTFT (including the hand-off) of ``req`` on prefill ``p``, decode ``d``."""
    rate = model.prefill_rate(p)
    bs = p.report.block_size or 16
    hit = min(cached_prefix_blocks(req.prefix_hashes, p.cached_hashes) * bs, max(req.num_prompt_tokens - 1, 0))
    uncached = req.num_prompt_tokens - hit
    backlog = p.queued_prefill_tokens() / rate
    if p.node_id == d.node_id:
        # A colocated node interleaves decode steps with the prefill.
        backlog += model.decode_step_s(p) if p.num_decode_seqs() else 0.0
    blocks = prompt_blocks(req.num_prompt_tokens, bs)
    ttft = backlog + uncached / rate + model.transfer_s(p, d, blocks)
    return Estimate(ttft_s=ttft, uncached_tokens=uncached, transfer_blocks=blocks)


def decode_blocks_needed(req: PlaceRequest, d: NodeEntry) -> int:
    """Blocks the request's KV takes on ``d`` at its longest: prompt plus every output token,
    up to ``d``'s ``max_model_len``, where its engine ends the sequence. (Uncapped, a request
    that leaves ``max_tokens`` to default to the gateway's context length would need more
    than a pool the node's engine capped ``max_model_len`` to, and never find room.)"""
    tokens = req.num_prompt_tokens + req.max_tokens
    if d.report.max_model_len > 0:
        tokens = min(tokens, d.report.max_model_len)
    return prompt_blocks(tokens, d.report.block_size or 16)


def decode_has_room(req: PlaceRequest, d: NodeEntry) -> bool:
    return d.free_blocks() >= decode_blocks_needed(req, d)


def decode_load(model: CostModel, d: NodeEntry) -> float:
    """Sequences on ``d`` (with the one being placed) times its step time: its decode load."""
    return (d.num_decode_seqs() + 1) * model.decode_step_s(d)


def decode_utilisation(d: NodeEntry) -> float:
    """How full ``d``'s decode side is by its last report, 0..1: batch slots or KV blocks,
    whichever is tighter. In-flight placements are left out: they reserve room for
    requests still queued for prefill, which says nothing about decode being short."""
    r = d.report
    blocks_used = 1.0 - r.free_blocks / r.total_blocks if r.total_blocks > 0 else 0.0
    return max(r.num_running / d.max_num_seqs, blocks_used)
