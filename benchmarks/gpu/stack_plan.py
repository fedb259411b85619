"""The experiments of the full-stack benchmark and the per-model settings they run with.

An :class:`Experiment` is a cluster layout (one ``flowkv up``, or K independent colocated
ones, one per GPU) plus the load runs to drive through it. :func:`catalog` names them for
a GPU count; :data:`PROFILES` holds the lengths, rates and node settings per model, so the
same plan runs Llama-3.1-8B on H100s and the tiny preset on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stack_cluster import Shape

# The role controller on the time scale of 15-30 s runs (its defaults suit hours-long serving).
SCHED_ENV = {"FLOWKV_SCHEDULER_MIN_DWELL_S": "3", "FLOWKV_SCHEDULER_DEMAND_WINDOW_S": "5",
             "FLOWKV_SCHEDULER_ROLE_INTERVAL_S": "0.25"}

# A lone hybrid node under ``flowkv`` gets flipped to decode by the demand signal (then 429
# "no ready prefill node"); the colocated baseline needs a policy without a role controller.
COLO_POLICY = "least_loaded"


@dataclass(frozen=True)
class Profile:
    """Per-model settings. Lengths: (workload, length_scale); rates in req/s for 2 and 4 GPUs."""

    node_env: dict[str, str]
    dtype: str
    long: tuple[str, float]  # the LongBench-like long-prompt mix and its scale
    synth_scale: dict[str, float]  # 1k / 5k / 10k: length_scale (1.0 on GPU: the paper's lengths)
    rates2: dict[str, list[float]]  # 2-GPU runs: workload -> rates (long first, then low, high)
    rates4: dict[str, float]  # 4-GPU runs at 4 GPUs (scaled by gpus / 4)
    shift_lens: tuple[int, int]  # --input-len/--output-len of the shift workload
    warm_input: int
    greedy_prompt: int
    greedy_output: int
    handoff_min_prompt: float  # the hand-off target is judged on runs with prompts this long
    duration_s: float
    shift_duration_s: float
    tail_s: float  # expected drain after the last arrival (for the time budget)
    lead_in_s: float  # every multi-GPU cluster's un-measured lead-in before its first run
    startup_s: float  # expected cluster start (for the time budget)
    request_timeout_s: float
    # The headline comparison (FlowKV against the block-wise baseline): LongBench-like mix ->
    # its two rates on one or two GPUs (scaled by gpus / 2 beyond), the length scale, and
    # the node settings both clusters get on top of node_env.
    headline_rates: dict[str, list[float]] = field(default_factory=dict)
    headline_scale: float = 1.0
    headline_env: dict[str, str] = field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    # 8B on an 80 GB H100: 16 GB weights, the pool takes 85% of what is left (~46 GB = ~370k tokens);
    # 8192 batched tokens: a 10k prompt prefills in 2 chunks.
    "llama-3.1-8b": Profile(
        node_env={"FLOWKV_NODE_MAX_NUM_SEQS": "64", "FLOWKV_NODE_MAX_NUM_BATCHED_TOKENS": "8192",
                  "FLOWKV_NODE_MAX_MODEL_LEN": "32768"},
        dtype="bfloat16", long=("gov_report", 0.5), synth_scale={"1k": 1.0, "5k": 1.0, "10k": 1.0},
        rates2={"long": [2.0, 4.0], "10k": [1.5], "1k": [8.0]}, rates4={"long": 8.0, "shift": 5.0},
        shift_lens=(2048, 256), warm_input=8192, greedy_prompt=512, greedy_output=32, handoff_min_prompt=8000,
        duration_s=15.0, shift_duration_s=30.0, tail_s=12.0, lead_in_s=10.0, startup_s=60.0, request_timeout_s=120.0,
        # LongBench lengths as they are (means 11.4k / 13.8k / 2.7k tokens in, clipped at 3x the
        # mean: up to 41.4k for qmsum, hence the longer max_model_len); rates that keep one
        # shared GPU's prefill below saturation at the lower and near it at the higher.
        headline_rates={"gov_report": [0.5, 1.0], "qmsum": [0.5, 1.0], "multi_news": [2.0, 4.0]},
        headline_env={"FLOWKV_NODE_MAX_MODEL_LEN": "49152"}),
    # The CPU dry run: tiny preset (2048 positions), float32, a few seconds a run.
    "tiny": Profile(
        node_env={"FLOWKV_NODE_MAX_NUM_SEQS": "64", "FLOWKV_NODE_MAX_NUM_BATCHED_TOKENS": "1024",
                  "OMP_NUM_THREADS": "1"},
        dtype="", long=("gov_report", 0.02), synth_scale={"1k": 0.1, "5k": 0.06, "10k": 0.05},
        rates2={"long": [2.0, 4.0], "10k": [2.0], "1k": [4.0]}, rates4={"long": 4.0, "shift": 10.0},
        shift_lens=(450, 16), warm_input=256, greedy_prompt=64, greedy_output=16, handoff_min_prompt=400,
        duration_s=5.0, shift_duration_s=20.0, tail_s=5.0, lead_in_s=5.0, startup_s=25.0, request_timeout_s=60.0,
        headline_rates={"gov_report": [1.0, 2.0], "qmsum": [1.0, 2.0], "multi_news": [2.0, 4.0]},
        headline_scale=0.02),
}


@dataclass
class Experiment:
    """One cluster layout and its runs. ``kind``: ``disagg`` (P/D hand-offs) or ``colo``."""

    name: str
    kind: str
    shapes: list[Shape]  # one per ``flowkv up``; several = independent colocated clusters
    runs: list[dict[str, Any]]
    kv_transport: str = ""
    want_roles: tuple[int, int] | None = None  # fixed split: wait for this many P and D
    env: dict[str, str] = field(default_factory=dict)  # extra environment of its services
    greedy: bool = True
    # Seconds of the first run's workload, driven and drained before it and not measured:
    # a policy with a role controller is measured at the split it settles on, as it would
    # serve a steady load (how fast it gets there is what the shift run shows), and every
    # cluster it is compared with gets the same lead-in, so that all are measured with
    # pools that have served a pool's worth of prompts (prefix cache full, evicting).
    lead_in_s: float = 0.0


def _run(workload: str, rate: float, scale: float, duration: float, **kw: Any) -> dict[str, Any]:
    return {"workload": workload, "rate": rate, "length_scale": scale, "duration_s": duration, **kw}


def _devices(device: str, n: int) -> list[str]:
    return [f"cuda:{i}" for i in range(n)] if device == "cuda" else [device] * n


def transport(name: str, device: str) -> str:
    """The forced KV transport: on CPU, ``shm`` stands for cuda_ipc and ``tcp`` for nccl."""
    if device == "cpu":
        return {"cuda_ipc": "shm", "nccl": "tcp"}[name]
    return name


# One GPU: the 1P1D nodes share it, each with a pool of at most this many blocks (2 MiB
# each for Llama-3.1-8B: 31 GiB, 256k tokens) instead of 85% of the memory its weights
# leave free, so that the second node to start finds room. That fits two nodes on a
# 141 GB H200; on an 80 GB H100 (79 GiB usable) each node's weights, CUDA context and
# graphs take about 21.4 GiB besides the pool, and two pools of 16,000 blocks do not fit:
# :func:`shared_gpu_num_blocks` sizes them by the card.
SHARED_GPU_NUM_BLOCKS = 16_000
SHARED_GPU_NODE_GIB = 22.0  # a Llama-3.1-8B node's memory besides its pool (measured: 21.4 GiB)
SHARED_GPU_SPARE_GIB = 3.0  # left free on the card
SHARED_GPU_BLOCK_GIB = 2 / 1024  # one Llama-3.1-8B block of 16 tokens, bf16


def shared_gpu_num_blocks(total_gib: float | None = None) -> int:
    """The pool of each of two nodes sharing one GPU of ``total_gib`` (default: GPU 0's
    memory; without CUDA, :data:`SHARED_GPU_NUM_BLOCKS`)."""
    if total_gib is None:
        try:
            import torch

            if not torch.cuda.is_available():
                return SHARED_GPU_NUM_BLOCKS
            total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        except Exception:  # no torch, no driver: the plan is only being read
            return SHARED_GPU_NUM_BLOCKS
    room = (total_gib - SHARED_GPU_SPARE_GIB) / 2 - SHARED_GPU_NODE_GIB
    return max(1000, min(SHARED_GPU_NUM_BLOCKS, int(room / SHARED_GPU_BLOCK_GIB) // 1000 * 1000))


def _two_gpu(p: Profile, device: str, gpus: int = 2) -> dict[str, Experiment]:
    wl, scale = p.long
    d = p.duration_s
    long = [_run(wl, r, scale, d) for r in p.rates2["long"]]
    synth = [_run(w, r, p.synth_scale[w], d) for w in ("10k", "1k") for r in p.rates2[w]]
    dev2 = _devices(device, 2)
    shared = device == "cuda" and gpus == 1
    one_gpu = {"1p1d_ipc": Experiment(
        "1p1d_ipc", "disagg", [Shape(1, 1, 0, device, "fixed:1:1")], long + synth, transport("cuda_ipc", device),
        want_roles=(1, 1), env={"FLOWKV_NODE_NUM_BLOCKS": str(shared_gpu_num_blocks())} if shared else {})}
    one_gpu["1colo"] = Experiment("1colo", "colo", [Shape(0, 0, 1, dev2[0], COLO_POLICY)], long[:1])
    if shared:  # two nodes on one GPU over CUDA IPC; NCCL cannot put two ranks on one device
        return one_gpu
    return {
        "1p1d_ipc": one_gpu["1p1d_ipc"],
        "2colo": Experiment("2colo", "colo", [Shape(0, 0, 1, dev, COLO_POLICY) for dev in dev2], long + synth),
        "1p1d_nccl": Experiment("1p1d_nccl", "disagg", [Shape(1, 1, 0, device, "fixed:1:1")],
                                [synth[0], long[-1]], transport("nccl", device), want_roles=(1, 1)),
        "1colo": one_gpu["1colo"],
    }


def _multi_gpu(p: Profile, device: str, gpus: int) -> dict[str, Experiment]:
    """The scheduler (``flowkv``, launched half P, half D) against every fixed split and
    ``gpus`` colocated nodes, each on the long-prompt mix and on the shifting workload,
    each after the same lead-in."""
    wl, scale = p.long
    k = gpus / 4
    long = _run(wl, p.rates4["long"] * k, scale, p.duration_s)
    inp, outp = p.shift_lens
    shift = _run("shift", p.rates4["shift"] * k, 1.0, p.shift_duration_s, input_len=inp, output_len=outp)
    half = gpus // 2
    out: dict[str, Experiment] = {
        "flowkv": Experiment("flowkv", "disagg", [Shape(half, half, 0, device, "flowkv")], [long, shift],
                             env=SCHED_ENV, greedy=False, lead_in_s=p.lead_in_s),
    }
    for np_ in range(1, gpus):
        nd = gpus - np_
        if gpus > 4 and np_ not in (gpus // 4, half, gpus - gpus // 4):
            continue  # 8 GPUs: the 2:6, 4:4 and 6:2 splits
        name = f"{np_}p{nd}d"
        out[name] = Experiment(name, "disagg", [Shape(np_, nd, 0, device, f"fixed:{np_}:{nd}")], [long, shift],
                               want_roles=(np_, nd), greedy=np_ == half, lead_in_s=p.lead_in_s)
    colo = f"{gpus}colo"
    out[colo] = Experiment(colo, "colo", [Shape(0, 0, 1, dev, COLO_POLICY) for dev in _devices(device, gpus)],
                           [long, shift], lead_in_s=p.lead_in_s)
    return out


GRANULARITY_ENV = "FLOWKV_NODE_KV_TRANSFER_GRANULARITY"
# The headline pairs: (baseline, FlowKV) experiment names per KV transport.
HEADLINE_PAIRS = {"cuda_ipc": ("baseline_ipc", "flowkv_ipc"), "nccl": ("baseline_nccl", "flowkv_nccl")}


def _headline(p: Profile, device: str, gpus: int) -> dict[str, Experiment]:
    """FlowKV against the vLLM-disagg baseline on the same GPUs, arrivals and model shapes.

    ``baseline_*``: block-wise KV transfer (one call per block, layer and K/V), fixed roles
    (launched P and D, no role controller) and round-robin placement. ``flowkv_*``: merged
    transfer and the ``flowkv`` policy (cost-model placement, role controller), launched
    with the same P and D. Each over CUDA IPC and over NCCL (forced); with one GPU both
    nodes share it and only CUDA IPC runs (NCCL refuses two ranks on one device).
    """
    n = max(1, gpus // 2)
    k = max(1.0, gpus / 2)
    runs = [_run(w, r * k, p.headline_scale, p.duration_s) for w, rates in p.headline_rates.items() for r in rates]
    shared = device == "cuda" and gpus == 1
    env = {**p.headline_env, **({"FLOWKV_NODE_NUM_BLOCKS": str(shared_gpu_num_blocks())} if shared else {})}
    out: dict[str, Experiment] = {}
    for name, (base, flow) in HEADLINE_PAIRS.items():
        if name == "nccl" and shared:
            continue
        kv = transport(name, device)
        out[base] = Experiment(base, "disagg", [Shape(n, n, 0, device, "round_robin")], [dict(r) for r in runs], kv,
                               want_roles=(n, n), env={**env, GRANULARITY_ENV: "blockwise"})
        out[flow] = Experiment(flow, "disagg", [Shape(n, n, 0, device, "flowkv")], [dict(r) for r in runs], kv,
                               want_roles=(n, n), env={**env, GRANULARITY_ENV: "merged"})
    return out


def headline_experiments(gpus: int, device: str = "cuda") -> list[str]:
    """The headline set in running order: per transport, FlowKV first (a fresh machine's
    first cluster pays for first use; FlowKV taking it keeps the comparison conservative);
    with two GPUs or more the NCCL pair first, which one shared GPU cannot run, so that a
    time budget that runs out cuts the CUDA IPC pair."""
    if device == "cuda" and gpus == 1:
        return list(reversed(HEADLINE_PAIRS["cuda_ipc"]))
    return [n for t in ("nccl", "cuda_ipc") for n in reversed(HEADLINE_PAIRS[t])]


def catalog(profile: Profile, device: str, gpus: int) -> dict[str, Experiment]:
    """Every experiment this GPU count can run, by name (the 2-GPU ones on any count)."""
    out = _two_gpu(profile, device, gpus)
    if gpus >= 4:
        out.update(_multi_gpu(profile, device, gpus))
    out.update(_headline(profile, device, gpus))
    return out


def fixed_splits(gpus: int) -> list[str]:
    """The fixed-split experiments of the multi-GPU set, most prefill first."""
    quarter, half = gpus // 4, gpus // 2
    splits = range(gpus - 1, 0, -1) if gpus <= 4 else (gpus - quarter, half, quarter)
    return [f"{np_}p{gpus - np_}d" for np_ in splits]


def default_experiments(gpus: int) -> list[str]:
    """Most important first: a time budget that runs out skips the tail."""
    if gpus == 1:
        return ["1p1d_ipc", "1colo"]
    if gpus < 4:
        return ["1p1d_ipc", "2colo", "1p1d_nccl", "1colo"]
    return ["flowkv", f"{gpus}colo", *fixed_splits(gpus)]


def scheduler_targets(gpus: int) -> tuple[dict[str, str], tuple[str, ...]]:
    """(workload -> experiment run under the flowkv policy, the fixed-split experiments)."""
    return ({"long": "flowkv", "shift": "flowkv"}, tuple(fixed_splits(gpus)))
