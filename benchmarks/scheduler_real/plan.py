"""The pure parts of the real-cluster scheduler benchmark: CPU placement, scenario rates, request streams.

Rates are multiples of what the 2:2 cluster carried in the calibration bursts, so the
scenarios mean the same on any machine:

  normal     ``normal`` x the 2:2 capacity for the normal mix
  imbalance_prefill  computational imbalance towards prefill: prompt-heavy requests at
                     ``imbalance`` x the 2:2 capacity for them, sustained for ``phase_s``
  imbalance_decode   the same towards decode: output-heavy requests
  overload   ``overload`` x the 2:2 capacity for the half/half mix of both kinds
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np

from libs.loadgen.workloads import RequestSpec

NODES = 4
NODE_IDS = ("prefill-0", "prefill-1", "decode-0", "decode-1")  # `flowkv up --prefill-nodes 2 --decode-nodes 2`


@dataclass(frozen=True)
class Kind:
    """One kind of request: uniform prompt and output lengths (tokens)."""

    prompt: tuple[int, int]
    output: tuple[int, int]

    @property
    def mean_output(self) -> float:
        return sum(self.output) / 2


PROMPT_HEAVY = Kind((1200, 1800), (2, 4))
OUTPUT_HEAVY = Kind((32, 64), (96, 160))
NORMAL = Kind((100, 400), (16, 48))
# A mix draws each request's kind uniformly from its kinds.
MIXES: dict[str, tuple[Kind, ...]] = {
    "prefill": (PROMPT_HEAVY,),
    "decode": (OUTPUT_HEAVY,),
    "normal": (NORMAL,),
    "mixed": (PROMPT_HEAVY, OUTPUT_HEAVY),
}
SCENARIOS = ("normal", "imbalance_prefill", "imbalance_decode", "overload")
# A computational imbalance lasts: a 1:1 split carries 1.0x of the side in demand, a 3:1 (or
# 1:3) split 1.5x. Alternating short phases would not show it, since 1:1 clears one phase's
# excess in the next, when the other side idles (the simulator's alternating imbalance has
# phases of a minute, at rates far above 1:1's capacity on each side).


def mean_output(mix: str) -> float:
    kinds = MIXES[mix]
    return sum(k.mean_output for k in kinds) / len(kinds)


# ---------------------------------------------------------------- CPU placement


@dataclass(frozen=True)
class ClusterCpus:
    """The cores of one cluster: one set per node (in NODE_IDS order) and one for the rest.

    ``nodes`` is empty when the cluster shares its cores (too few to pin nodes apart).
    """

    nodes: tuple[tuple[int, ...], ...]
    service: tuple[int, ...]  # gateway, scheduler, nats-server, `flowkv up` itself

    @property
    def all(self) -> tuple[int, ...]:
        return tuple(sorted({c for n in self.nodes for c in n} | set(self.service)))


@dataclass(frozen=True)
class CpuPlan:
    """Where every cluster runs.

    parallel: the clusters run at once (else one after another, each on ``clusters[0]``).
    shared: too few cores for disjoint sets: every cluster gets the whole pool, unpinned nodes.
    driver: the load generators and the main process (the service cores when empty).
    """

    parallel: bool
    shared: bool
    clusters: tuple[ClusterCpus, ...]
    driver: tuple[int, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {"parallel": self.parallel, "shared": self.shared, "driver": list(self.driver),
                "clusters": [{"nodes": [list(n) for n in c.nodes], "service": list(c.service)} for c in self.clusters]}


def placement(cpus: ClusterCpus, driver: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The cores of each of a cluster's processes (none when it shares its cores).

    The gateway streams every token of the cluster in one Python thread, so it gets a
    core of its own; the scheduler, nats-server and ``flowkv up`` (light) take the second
    service core, or share the driver's cores when there is none.
    """
    if not cpus.nodes:
        return {}
    out = dict(zip(NODE_IDS, cpus.nodes))
    rest = cpus.service[1:] or driver or cpus.service
    out.update({"gateway": cpus.service[:1], "scheduler": rest, "nats": rest, "flowkv-up": rest})
    return out


def parse_cpus(text: str) -> list[int]:
    """``"16-63,70"`` -> [16, ..., 63, 70] (taskset's list syntax)."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if a < 0 or b < a:
            raise ValueError(f"bad CPU range {part!r}")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError(f"no CPUs in {text!r}")
    return sorted(out)


def cpus_label(cpus: list[int]) -> str:
    """[16, 17, 18, 20] -> "16-18,20" (the inverse of :func:`parse_cpus`)."""
    parts: list[str] = []
    for c in sorted(set(cpus)):
        if parts and int(parts[-1].split("-")[-1]) == c - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{c}"
        else:
            parts.append(str(c))
    return ",".join(parts)


def cluster_cores(node_threads: int, service: int) -> int:
    return NODES * node_threads + service


def _layout(cores: list[int], node_threads: int) -> ClusterCpus:
    nodes = tuple(tuple(cores[i * node_threads:(i + 1) * node_threads]) for i in range(NODES))
    return ClusterCpus(nodes, tuple(cores[NODES * node_threads:]))


def plan_cpus(pool: list[int], num_clusters: int, node_threads: int, parallel: bool | None = None,
              max_service: int = 2) -> CpuPlan:
    """Split ``pool`` among ``num_clusters`` clusters of NODES nodes.

    Each cluster needs ``node_threads`` cores per node plus 1..``max_service`` cores for its
    gateway, scheduler and nats-server. Cores left over go to the load generators (the
    driver); when none would be left, a cluster gives up its second service core for them.

    Args:
        pool: the cores to use, e.g. ``sorted(os.sched_getaffinity(0))``.
        num_clusters: clusters to place.
        node_threads: torch threads (and cores) per node.
        parallel: force parallel (True) or sequential (False); None: parallel if it fits.
        max_service: most service cores per cluster.
    """
    if num_clusters < 1 or node_threads < 1 or max_service < 1:
        raise ValueError("num_clusters, node_threads and max_service must be >= 1")
    pool = sorted(set(pool))
    need = cluster_cores(node_threads, 1)
    fits = len(pool) >= num_clusters * need
    if parallel is None:
        parallel = fits
    n = num_clusters if parallel else 1
    if len(pool) < n * need:  # forced parallel (or one cluster) on too few cores: share them
        return CpuPlan(parallel, True, tuple(ClusterCpus((), tuple(pool)) for _ in range(n)), ())
    service = min(max_service, len(pool) // n - NODES * node_threads)
    if service > 1 and len(pool) - n * cluster_cores(node_threads, service) < 1:
        service -= 1
    per = cluster_cores(node_threads, service)
    clusters = tuple(_layout(pool[i * per:(i + 1) * per], node_threads) for i in range(n))
    return CpuPlan(parallel, False, clusters, tuple(pool[n * per:]))


# ---------------------------------------------------------------- scenario rates


@dataclass(frozen=True)
class Phase:
    duration_s: float
    rate: float  # requests/s, Poisson
    mix: str  # a key of MIXES

    def to_json(self) -> dict[str, object]:
        return {"duration_s": self.duration_s, "rate": round(self.rate, 3), "mix": self.mix}


@dataclass(frozen=True)
class Multipliers:
    """Scenario rates as multiples of the measured 2:2 capacity for their mix."""

    normal: float = 0.5
    imbalance: float = 1.4
    overload: float = 2.0


@dataclass(frozen=True)
class Durations:
    normal_s: float = 20.0
    phase_s: float = 30.0  # each imbalance scenario
    overload_s: float = 20.0


def scenario_phases(capacity: dict[str, float], mult: Multipliers, dur: Durations) -> dict[str, list[Phase]]:
    """Every scenario's phases from the 2:2 cluster's calibration figures.

    Args:
        capacity: requests/s the 2:2 cluster carried per mix (``prefill``, ``decode``,
            ``normal``, ``mixed``).
    """
    for mix in MIXES:
        if capacity.get(mix, 0.0) <= 0.0:
            raise ValueError(f"calibration: the 2:2 cluster carried nothing of the {mix!r} mix")
    return {
        "normal": [Phase(dur.normal_s, mult.normal * capacity["normal"], "normal")],
        "imbalance_prefill": [Phase(dur.phase_s, mult.imbalance * capacity["prefill"], "prefill")],
        "imbalance_decode": [Phase(dur.phase_s, mult.imbalance * capacity["decode"], "decode")],
        "overload": [Phase(dur.overload_s, mult.overload * capacity["mixed"], "mixed")],
    }


def window_s(phases: list[Phase]) -> float:
    return sum(p.duration_s for p in phases)


# ---------------------------------------------------------------- request streams


def _streams(seed: str) -> tuple[random.Random, np.random.Generator]:
    """Lengths and times from ``random``, token ids from numpy (millions of them: 50x faster)."""
    return random.Random(seed), np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "little"))


def draw(rng: random.Random, ids: np.random.Generator, mix: str, index: int) -> RequestSpec:
    kinds = MIXES[mix]
    kind = kinds[rng.randrange(len(kinds))] if len(kinds) > 1 else kinds[0]
    n_in = rng.randint(*kind.prompt)
    return RequestSpec(index, ids.integers(100, 40001, size=n_in).tolist(), rng.randint(*kind.output))


def make_specs(phases: list[Phase], seed: str) -> tuple[list[RequestSpec], list[float]]:
    """The requests and their send times (Poisson per phase); the same for a seed.

    ``seed`` should name the scenario too, so two scenarios never share prompts (and prefix-cache hits).
    """
    rng, ids = _streams(seed)
    specs: list[RequestSpec] = []
    times: list[float] = []
    t0 = 0.0
    for ph in phases:
        t = t0 + rng.expovariate(ph.rate)
        while t < t0 + ph.duration_s:
            specs.append(draw(rng, ids, ph.mix, len(specs)))
            times.append(t)
            t += rng.expovariate(ph.rate)
        t0 += ph.duration_s
    return specs, times


def spec_stream(mix: str, seed: str):  # type: ignore[no-untyped-def]
    """Endless requests of ``mix`` (closed-loop calibration bursts)."""
    rng, ids = _streams(seed)
    i = 0
    while True:
        yield draw(rng, ids, mix, i)
        i += 1
