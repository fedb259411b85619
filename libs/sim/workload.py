"""The three scenarios of the paper as request streams (deterministic for a seed).

1. ``normal``: mixed prompts and outputs at a load the cluster can carry.
2. ``imbalance``: computational imbalance, alternating phases: prompt-heavy
   (LongBench-like 4-8k prompts, short answers) then output-heavy (short prompts, long
   answers), each above what a 1:1 split can serve on its bottleneck side.
3. ``overload``: both kinds mixed at once, far above capacity.
Rates scale with the number of nodes (given per 4 nodes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SCENARIOS = ("normal", "imbalance", "overload")
GOODPUT_SCENARIOS = ("long", "shift", "1k", "5k", "10k", "bursty")
"""The serving shapes of the GPU stack benchmark (``benchmarks/gpu``), for the goodput
comparison: ``long`` the LongBench-like mix (gov_report, 5.6k in / 241 out on average),
``shift`` 8192 in / 64 out then 512 in / 1024 out, the paper's synthetic 1k / 5k / 10k
sets (prompts of about that many tokens, 100-300 out), and ``bursty``, the long mix
arriving in bursts of 4 s at 3x its mean rate between 8 s lulls at a tenth of it."""


@dataclass(frozen=True)
class Phase:
    duration_s: float
    rate_per_4: float  # requests/s for 4 nodes
    prompt: tuple[int, int]  # uniform range of prompt tokens
    output: tuple[int, int]  # uniform range of output tokens


@dataclass
class SimRequest:
    request_id: str
    arrival: float
    num_prompt_tokens: int
    max_tokens: int


PHASES: dict[str, list[Phase]] = {
    "normal": [Phase(120.0, 14.0, (500, 3000), (100, 400))],
    "imbalance": [
        Phase(60.0, 16.0, (4000, 8000), (20, 100)),
        Phase(60.0, 40.0, (100, 300), (400, 1000)),
        Phase(60.0, 16.0, (4000, 8000), (20, 100)),
        Phase(60.0, 40.0, (100, 300), (400, 1000)),
    ],
    "overload": [
        Phase(120.0, 30.0, (4000, 8000), (20, 100)),
    ],
    "long": [Phase(120.0, 11.0, (2000, 9200), (80, 400))],
    "shift": [Phase(60.0, 8.0, (8192, 8192), (64, 64)), Phase(60.0, 8.0, (512, 512), (1024, 1024))],
    "1k": [Phase(120.0, 60.0, (800, 1200), (100, 300))],
    "5k": [Phase(120.0, 14.0, (4500, 5500), (100, 300))],
    "10k": [Phase(120.0, 7.0, (9000, 11000), (100, 300))],
    "bursty": [Phase(4.0, 27.0, (2000, 9200), (80, 400)), Phase(8.0, 0.9, (2000, 9200), (80, 400))] * 10,
}


def _overload_mix(rng: random.Random, t: float, rid: int) -> SimRequest:
    # Half long prompts with short answers, half short prompts with long answers.
    if rng.random() < 0.5:
        return SimRequest(f"r{rid}", t, rng.randint(4000, 8000), rng.randint(20, 100))
    return SimRequest(f"r{rid}", t, rng.randint(100, 300), rng.randint(400, 1000))


def generate(scenario: str, num_nodes: int, seed: int = 0, scale: float = 1.0, lead_in_s: float = 0.0) -> list[SimRequest]:
    """Poisson arrivals of the scenario for ``num_nodes`` nodes.

    Args:
        scenario: one of :data:`SCENARIOS` or :data:`GOODPUT_SCENARIOS`.
        num_nodes: the cluster size (rates are per 4 nodes, scaled linearly).
        seed: random seed; the same seed gives the same requests.
        scale: multiplies the phase durations (shorter runs for tests).
        lead_in_s: an unmeasured lead-in of this many seconds of the first phase before
            the scenario (which then starts at ``lead_in_s``): every policy is measured
            from a cluster already serving the load, past its start-up.
    """
    if scenario not in PHASES:
        raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(PHASES)}")
    rng = random.Random(seed)
    out: list[SimRequest] = []
    t0 = 0.0
    phases = PHASES[scenario]
    if lead_in_s > 0:
        phases = [Phase(lead_in_s / scale, phases[0].rate_per_4, phases[0].prompt, phases[0].output), *phases]
    for phase in phases:
        rate = phase.rate_per_4 * num_nodes / 4
        end = t0 + phase.duration_s * scale
        t = t0 + rng.expovariate(rate)
        while t < end:
            if scenario == "overload":
                out.append(_overload_mix(rng, t, len(out)))
            else:
                out.append(SimRequest(f"r{len(out)}", t, rng.randint(*phase.prompt), rng.randint(*phase.output)))
            t += rng.expovariate(rate)
        t0 = end
    return out


def duration(scenario: str, scale: float = 1.0, lead_in_s: float = 0.0) -> float:
    """The scenario's arrival window (after a lead-in of ``lead_in_s``, when given), in seconds."""
    return sum(p.duration_s for p in PHASES[scenario]) * scale + lead_in_s
