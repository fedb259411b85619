"""Workloads of ``flowkv bench``: how many tokens each request sends and asks for.

A workload is a list of :class:`RequestSpec`, fully determined by its name, its options
and the seed. Prompts are random token ids drawn from ``token_id_range`` (default
``[1000, 30000)``: clear of SmolLM2's special ids 0-16 and Llama 3's 128000+, inside
every supported vocabulary), sent as ``prompt: [ids]`` so the server sees exactly
``input_len`` tokens; with ``ignore_eos`` the output is exactly ``output_len`` tokens.

Workloads (lengths in tokens; ``--length-scale`` multiplies every length, min 1):

- ``fixed``: every request ``--input-len`` in, ``--output-len`` out.
- ``random``: input uniform in ``[input_len * (1 - range_ratio), input_len * (1 + range_ratio)]``,
  output likewise (vLLM's ``random`` dataset).
- ``1k``, ``5k``, ``10k``: the FlowKV paper's synthetic sets, 1,000 / 5,000 / 10,000 in
  and 256 out.
- ``gov_report``, ``multi_news``, ``qmsum``: LongBench-like length mixes. Inputs are
  lognormal with the mean of the task's LongBench average length (LongBench ``task.md``:
  GovReport 8,734 words, MultiNews 2,113, QMSum 10,614) times 1.3 tokens per English
  word (11,354 / 2,747 / 13,798 tokens), sigma 0.5. Outputs are lognormal with the mean
  of the source datasets' reference summaries (GovReport 553 words, Huang et al. 2021;
  Multi-News 264, Fabbri et al. 2019; QMSum 70, Zhong et al. 2021; x1.3: 719 / 343 / 91
  tokens), sigma 0.35, capped at LongBench's generation limit for these tasks (512). The
  sigmas are ours, not published. Every length is clipped to [mean/8, mean*3] (input) so
  one draw cannot exceed a model's context by chance.
- ``shift``: first half prompt-heavy (``input_len * 4`` in, ``output_len // 4`` out),
  second half output-heavy (``input_len // 4`` in, ``output_len * 4`` out): the load
  shape that makes the scheduler flip node roles.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

DEFAULT_TOKEN_ID_RANGE = (1000, 30000)
TOKENS_PER_WORD = 1.3
LONGBENCH_MAX_GEN = 512


class Workload(str, enum.Enum):
    FIXED = "fixed"
    RANDOM = "random"
    SYNTH_1K = "1k"
    SYNTH_5K = "5k"
    SYNTH_10K = "10k"
    GOV_REPORT = "gov_report"
    MULTI_NEWS = "multi_news"
    QMSUM = "qmsum"
    SHIFT = "shift"


@dataclass(frozen=True)
class LengthMix:
    """A LongBench-like task: lognormal input and output lengths with these means (tokens)."""

    input_mean: float
    output_mean: float
    input_sigma: float = 0.5
    output_sigma: float = 0.35
    output_cap: int = LONGBENCH_MAX_GEN


# Means: LongBench average lengths (words) and reference-summary lengths (words), x1.3 tokens/word.
LONGBENCH_MIXES: dict[Workload, LengthMix] = {
    Workload.GOV_REPORT: LengthMix(8734 * TOKENS_PER_WORD, 553 * TOKENS_PER_WORD),
    Workload.MULTI_NEWS: LengthMix(2113 * TOKENS_PER_WORD, 264 * TOKENS_PER_WORD),
    Workload.QMSUM: LengthMix(10614 * TOKENS_PER_WORD, 70 * TOKENS_PER_WORD),
}
SYNTHETIC_INPUT = {Workload.SYNTH_1K: 1000, Workload.SYNTH_5K: 5000, Workload.SYNTH_10K: 10000}
SYNTHETIC_OUTPUT = 256


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: its exact prompt and the number of tokens to ask for."""

    index: int
    prompt_token_ids: list[int]
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class WorkloadOptions:
    """Knobs of :func:`make_workload` (the ``flowkv bench`` flags of the same names)."""

    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.5
    length_scale: float = 1.0
    token_id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input_len and output_len must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.length_scale <= 0:
            raise ValueError(f"length_scale must be positive, got {self.length_scale}")
        lo, hi = self.token_id_range
        if not 0 <= lo < hi:
            raise ValueError(f"token_id_range must satisfy 0 <= lo < hi, got {self.token_id_range}")


def _scaled(n: float, scale: float) -> int:
    return max(1, int(round(n * scale)))


def _lengths(workload: Workload, n: int, opts: WorkloadOptions, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(input_len, output_len) per request, before ``length_scale``."""
    if workload is Workload.FIXED:
        return [(opts.input_len, opts.output_len)] * n
    if workload is Workload.RANDOM:
        r = opts.range_ratio
        ins = rng.integers(int(opts.input_len * (1 - r)), int(opts.input_len * (1 + r)) + 1, size=n)
        outs = rng.integers(int(opts.output_len * (1 - r)), int(opts.output_len * (1 + r)) + 1, size=n)
        return [(max(1, int(i)), max(1, int(o))) for i, o in zip(ins, outs)]
    if workload in SYNTHETIC_INPUT:
        return [(SYNTHETIC_INPUT[workload], SYNTHETIC_OUTPUT)] * n
    if workload in LONGBENCH_MIXES:
        mix = LONGBENCH_MIXES[workload]
        ins = _lognormal(rng, mix.input_mean, mix.input_sigma, n).clip(mix.input_mean / 8, mix.input_mean * 3)
        outs = _lognormal(rng, mix.output_mean, mix.output_sigma, n).clip(1, mix.output_cap)
        return [(int(round(i)), int(round(o))) for i, o in zip(ins, outs)]
    if workload is Workload.SHIFT:
        first = n // 2
        heavy_prompt = (opts.input_len * 4, max(1, opts.output_len // 4))
        heavy_output = (max(1, opts.input_len // 4), opts.output_len * 4)
        return [heavy_prompt] * first + [heavy_output] * (n - first)
    raise ValueError(f"unknown workload {workload!r}")


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, n: int) -> np.ndarray:
    # A lognormal's mean is exp(mu + sigma^2 / 2): pick mu so the mean is the published one.
    return rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, size=n)


def make_workload(name: str | Workload, num_requests: int, seed: int = 0, opts: WorkloadOptions | None = None) -> list[RequestSpec]:
    """Build the requests of a workload; the same arguments always give the same requests.

    Args:
        name: a :class:`Workload` or its value (``"fixed"``, ``"gov_report"``, ...).
        num_requests: how many requests.
        seed: seeds the lengths and the token ids.
        opts: lengths, scale and token id range (defaults: :class:`WorkloadOptions`).

    Returns:
        ``num_requests`` specs in sending order, each with exactly ``input_len`` prompt ids.
    """
    workload = Workload(name)
    opts = opts or WorkloadOptions()
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    rng = np.random.default_rng(seed)
    lo, hi = opts.token_id_range
    specs = []
    for i, (n_in, n_out) in enumerate(_lengths(workload, num_requests, opts, rng)):
        n_in, n_out = _scaled(n_in, opts.length_scale), _scaled(n_out, opts.length_scale)
        ids = rng.integers(lo, hi, size=n_in).tolist()
        specs.append(RequestSpec(i, ids, n_out))
    return specs


def describe(specs: list[RequestSpec]) -> dict[str, float]:
    """Mean and max input and output lengths of a workload (for the report header)."""
    ins = [s.input_len for s in specs]
    outs = [s.output_len for s in specs]
    return {"mean_input_len": float(np.mean(ins)), "max_input_len": max(ins),
            "mean_output_len": float(np.mean(outs)), "max_output_len": max(outs)}
