"""Node cost model of the simulator, calibrated in one place from figures measured here.

Sources (figures measured on H100s, Llama-3.1-8B shape, bf16):

| figure | value | used for |
| --- | --- | --- |
| HF prefill, 8192 tokens, batch 1 | 253 ms | prefill fit (1) |
| HF prefill, batch 32 x 512 tokens | 453 ms | prefill fit (2) |
| decode weight-read floor | 5.4 ms | ``decode_c`` (plus 2 ms launch/sampling, assumed) |
| same-GPU device copy, read + write | 2.8 TB/s | ``decode_e``: KV bytes/token read each step |
| NVLink peer copy, 1 GiB, one call | 2.73 ms = 367 GiB/s | ``bw_nvlink`` |
| one merged 1 GiB copy vs block-wise | 2.81 vs 2.73 ms | ``transfer_latency_s`` ~ 0.1 ms |

Prefill: t = a + b·Σtokens + q·Σtokens_i² with a = 15 ms (assumed launch overhead); (1)
and (2) then give b = 2.658e-5 s/token (37.6k tok/s) and q = 3.02e-10 s/token² (attention).
Decode step: t = c + d·batch + e·Σcontext; e = 131,072 B/token (32 layers x 2 x 8 heads x
128 x 2 B) / 2.8e12 B/s = 4.7e-8 s; d = 6e-5 s/sequence is 16 GFLOP/token at ~270 TFLOP/s
effective (an assumption: HF's batched step, 62 ms, is dominated by its own overheads).
KV capacity: 80 GB x 0.85 - 16 GB weights = 52 GB = 24,800 blocks of 16 tokens (2 MiB each).

A second device kind, ``A100_80G_8B``, for mixed clusters (an assumption: no A100 was
measured here). It is the H100 figures scaled by datasheet ratios (SXM parts):

| phase | bound by | A100 80GB / H100 | factor |
| --- | --- | --- | --- |
| prefill (``prefill_a/b/q``) | dense bf16 FLOP/s | 312 / 989 TFLOP/s | 0.32 |
| decode (``decode_c/d/e``) | HBM bandwidth | 2.04 / 3.35 TB/s | 0.61 |
| KV hand-off (``bw_nvlink``) | NVLink | 600 / 900 GB/s | 0.67 |

Prefill and decode are scaled apart because the H100's lead is compute (3.1x) in
prefill but memory bandwidth (1.6x) in decode. Every term of a phase takes its phase's
factor, the fixed overheads included (``prefill_a``: 15 -> 47 ms, ``decode_c``: 7.4 ->
12.1 ms), and ``decode_d`` (compute per sequence) takes the bandwidth factor: both are
simplifications of a roofline that was not measured. Memory (80 GB) and so KV capacity
are the same as the H100's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class NodeCosts:
    """Costs of one simulated node (one GPU running an 8B model)."""

    device_name: str = "NVIDIA H100 80GB HBM3 (simulated)"
    prefill_a: float = 0.015
    prefill_b: float = 2.658e-5
    prefill_q: float = 3.02e-10
    decode_c: float = 0.0074
    decode_d: float = 6e-5
    decode_e: float = 4.7e-8
    block_size: int = 16
    kv_block_bytes: int = 16 * 131_072
    total_blocks: int = 24_800
    max_num_seqs: int = 256
    max_batched_tokens: int = 16_384
    bw_nvlink: float = 367 * 2**30
    transfer_latency_s: float = 1e-4

    def prefill_s(self, prompt_lens: list[int]) -> float:
        """Time of one prefill batch of these (uncached) prompt lengths."""
        return self.prefill_a + self.prefill_b * sum(prompt_lens) + self.prefill_q * sum(n * n for n in prompt_lens)

    def decode_step_s(self, batch: int, total_context: int) -> float:
        return self.decode_c + self.decode_d * batch + self.decode_e * total_context

    def transfer_s(self, blocks: int) -> float:
        return self.transfer_latency_s + blocks * self.kv_block_bytes / self.bw_nvlink

    def scaled(self, speed: float, name: str, decode_speed: float | None = None) -> NodeCosts:
        """A device named ``name``, ``speed`` times as fast in prefill and ``decode_speed``
        times as fast in decode (default: ``speed``); memory, batch limits and links are kept.
        """
        ds = speed if decode_speed is None else decode_speed
        return replace(
            self, device_name=name, prefill_a=self.prefill_a / speed, prefill_b=self.prefill_b / speed,
            prefill_q=self.prefill_q / speed, decode_c=self.decode_c / ds, decode_d=self.decode_d / ds,
            decode_e=self.decode_e / ds,
        )


H100_8B = NodeCosts()
A100_80G_8B = replace(H100_8B.scaled(0.32, "NVIDIA A100-SXM4-80GB (simulated)", decode_speed=0.61),
                      bw_nvlink=H100_8B.bw_nvlink * 0.67)

DEVICE_KINDS: dict[str, NodeCosts] = {"h100": H100_8B, "a100": A100_80G_8B}
"""Device kinds by the short name ``--mix`` takes."""


def parse_mix(spec: str) -> list[NodeCosts]:
    """Node costs from a mix like ``h100:4,a100:4``: nodes n00, n01, ... take the kinds in
    the order written (a kind may appear more than once, e.g. ``a100:1,h100:1,a100:1,h100:1``).

    Raises:
        ValueError: an unknown kind, a count below 1, or a malformed part.
    """
    out: list[NodeCosts] = []
    for part in spec.split(","):
        kind, _, count = part.strip().partition(":")
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device kind {kind!r} in {spec!r}; one of {', '.join(DEVICE_KINDS)}")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"bad mix part {part!r}: use KIND:COUNT, e.g. h100:4") from None
        if n < 1:
            raise ValueError(f"bad mix part {part!r}: the count must be >= 1")
        out += [DEVICE_KINDS[kind]] * n
    return out
