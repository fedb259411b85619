"""When each request is sent: Poisson (or gamma, for bursts) inter-arrival times."""

from __future__ import annotations

import math

import numpy as np


def intervals(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before each request (the first included).

    Gaps are gamma-distributed with shape ``burstiness`` and mean ``1 / request_rate``:
    ``burstiness == 1`` is a Poisson process, below 1 burstier, above 1 more regular
    (vLLM's ``--burstiness``). ``request_rate == inf`` sends everything at once.

    Args:
        num_requests: how many gaps.
        request_rate: mean requests per second (``math.inf`` for no waiting).
        burstiness: the gamma shape, > 0.
        seed: seeds the draws.

    Returns:
        ``num_requests`` non-negative gaps in seconds.
    """
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request_rate and burstiness must be positive")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    scale = 1.0 / (request_rate * burstiness)
    return [float(x) for x in rng.gamma(shape=burstiness, scale=scale, size=num_requests)]
