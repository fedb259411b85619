"""Test-only fault injection, read from ``FLOWKV_FAULT_INJECT`` (off when unset, the default).

The reliability tests (``tests/reliability/``) use it to make a KV hand-off fail in a
real node process, where nothing can be patched from outside. The value is a
comma-separated list of ``name`` (every time) or ``name:count`` (the first ``count``
times, per process). Known names:

- ``kv_send_fail``: the prefill node's KV send raises ``TransferError`` before moving
  a byte (the decode node then recomputes);
- ``kv_done_drop``: the prefill node never sends ``KVDone`` after the transfer (as if it
  died there: the decode node's reservation must come back when its lease ends);
- ``engine_slow_step:SECONDS``: every engine step of the node also sleeps SECONDS (a
  busy node whose steps outlast the scheduler's node timeout must not be taken for a
  dead one). Its number is a duration, not a count.
- ``kv_send_stall:SECONDS``: every KV send of the prefill node waits SECONDS after the
  decode node reserved its blocks, before a byte is written (a test SIGKILLs the node or
  flips the decode node's role in that window). A duration too.

Never set it in production: a fault fires on real requests.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "FLOWKV_FAULT_INJECT"
KNOWN = frozenset({"kv_send_fail", "kv_done_drop", "engine_slow_step", "kv_send_stall"})
DURATIONS = frozenset({"engine_slow_step", "kv_send_stall"})  # faults whose number is seconds, not a count


def parse(spec: str) -> dict[str, float]:
    """``"a,b:2"`` -> ``{"a": -1, "b": 2}`` (-1: every time; a duration fault keeps its seconds).

    Raises:
        ValueError: an unknown fault name or a bad count.
    """
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, count = part.partition(":")
        if name not in KNOWN:
            raise ValueError(f"{ENV}: unknown fault {name!r} (known: {sorted(KNOWN)})")
        if name in DURATIONS:
            out[name] = float(count or 0)
        else:
            out[name] = int(count) if count else -1
        if count and out[name] <= 0:
            raise ValueError(f"{ENV}: count of {name!r} must be positive, got {count}")
    return out


_remaining: dict[str, float] = parse(os.environ.get(ENV, ""))
if _remaining:
    log.warning("FAULT INJECTION IS ON (%s=%s): for tests only", ENV, os.environ.get(ENV))


def fire(name: str) -> bool:
    """Whether fault ``name`` fires now (a counted fault is used up by firing)."""
    left = _remaining.get(name, 0)
    if left == 0:
        return False
    if left > 0:
        _remaining[name] = left - 1
    log.warning("injected fault %s", name)
    return True


def seconds(name: str) -> float:
    """The duration of fault ``name`` (0 when it is off)."""
    return float(_remaining.get(name, 0.0)) if name in DURATIONS else 0.0
