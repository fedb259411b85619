"""Pacing prompts against the objectives of the sequences a node decodes.

A node that runs both phases (a hybrid node, or a prefill node still finishing what it
decoded in an earlier role) stalls every running sequence for as long as each prefill
pass takes. A sequence's TPOT is its decode time over its tokens, so it tolerates stalls
up to what its objective leaves over its own steps, and no more; a prompt's TTFT is
its wait plus its prefill, so it tolerates a wait up to its objective. Where both
objectives are known, the node spends the prompts' slack before the sequences':

- a prefill pass runs now only if every running sequence that can still keep its TPOT
  objective keeps it with the pass's time added (:func:`prefill_slack`);
- otherwise prompts wait (the step decodes only), until one of them would miss its TTFT
  objective by waiting one more step (:func:`prompt_due`); then they run regardless.

:func:`prefill_allowance` is the two together, what a node asks before each step.

A sequence that will miss its objective anyway is not waited for; a prompt without a TTFT
objective never waits (there is no wait to weigh against), nor does any prompt when no
running sequence has a TPOT objective. The pass-by-pass picture is that of a colocated
server whose prompts are spread over the gaps its decode objectives leave: a burst of
prompts is absorbed by their TTFT slack instead of by the running streams' TPOT.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

STEP_GROWTH = 1.2
"""A sequence's remaining decode steps are taken this much longer than the step now:
steps lengthen as the waiting prompts join the batch."""

TTFT_GUARD = 0.1
"""A prompt is due this share of its TTFT objective before it would miss it."""


@dataclass(frozen=True)
class Objectives:
    """A request's objectives as its node paces it (0: none on that measure).

    Args:
        ttft_slo_s: the TTFT objective, counted from the request's arrival.
        tpot_slo_s: the TPOT objective.
        waited_s: how long the request had waited before it reached the node (the
            gateway's and the scheduler's queues): that much of its TTFT objective is spent.
    """

    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0
    waited_s: float = 0.0


@dataclass(frozen=True)
class Decoding:
    """A running sequence under a TPOT objective."""

    limit: float  # when its last token must be out (its first token's time + TPOT x its tokens after it)
    steps_left: int  # decode steps to its last token


@dataclass(frozen=True)
class Waiting:
    """A queued prompt under a TTFT objective, in the order the node prefills them."""

    deadline: float  # its arrival + its TTFT objective (in the node's clock)
    ttft_slo_s: float
    prefill_s: float  # its prefill time at the node's measured rate


def prefill_slack(now: float, decoding: Iterable[Decoding], step_s: float) -> float:
    """The most prefill time that may run before the next decode step without putting a
    running sequence past its TPOT objective (``inf``: no sequence to hold for). Sequences
    that miss their objective even without it are left out."""
    least = math.inf
    for seq in decoding:
        left = seq.steps_left * step_s
        if now + left <= seq.limit:
            least = min(least, max(0.0, seq.limit - now - STEP_GROWTH * left))
    return least


def prompt_due(now: float, waiting: Iterable[Waiting], step_s: float) -> bool:
    """Whether a prompt would miss its TTFT objective (less the guard) if prefill waited one
    more decode step: the queue run in order, each prompt after the ones before it, each
    pass followed by a decode step."""
    done = now + step_s
    for prompt in waiting:
        done += prompt.prefill_s + step_s
        if done >= prompt.deadline - TTFT_GUARD * prompt.ttft_slo_s:
            return True
    return False


def prefill_allowance(now: float, decoding: Iterable[Decoding], waiting: Iterable[Waiting], step_s: float) -> float:
    """The prefill time the next step may take: unbounded when a waiting prompt is due
    (:func:`prompt_due`), else what the running sequences can spare (:func:`prefill_slack`)."""
    return math.inf if prompt_due(now, waiting, step_s) else prefill_slack(now, decoding, step_s)
