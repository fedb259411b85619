"""The real-cluster scheduler benchmark's figures: window throughput, the answer check, the targets, markdown.

Throughput for the targets is the simulator's (``libs.sim.metrics``): requests completed
within the arrival window, over the window. A backlog that drains after the window does
not count, so a split that cannot keep up with a phase shows it. ``summarize()``'s
``request_throughput`` (first send -> last completion, backlog included) is reported too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libs.loadgen.metrics import RequestRecord
from libs.loadgen.workloads import RequestSpec

IMBALANCE_GAIN = 1.15  # flowkv / fixed 1:1 under imbalance
BEST_FIXED_SHARE = 0.95  # flowkv / best fixed split, every scenario
BASELINE = "fixed:1:1"


def _chunk_times(r: RequestRecord) -> list[float]:
    out, t = [], r.start + r.ttft
    out.append(t)
    for gap in r.itl:
        t += gap
        out.append(t)
    return out


def window_stats(records: list[RequestRecord], phase_s: list[float]) -> dict[str, Any]:
    """Completions within the arrival window (and within each phase), per second.

    Args:
        records: the scenario's records (``start`` relative to the first send time 0).
        phase_s: the phases' durations; the window is their sum.
    """
    window = sum(phase_s)
    done = [r for r in records if r.ok and r.start + r.e2e <= window]
    bounds, t = [], 0.0
    for d in phase_s:
        bounds.append((t, t + d))
        t += d
    per_phase = [sum(1 for r in done if lo < r.start + r.e2e <= hi) for lo, hi in bounds]
    out_tok = sum(r.output_tokens for r in done)
    return {"window_s": window, "window_completed": len(done), "window_rps": len(done) / window,
            "window_out_tok_s": out_tok / window, "phase_completed": per_phase}


def burst_rate(records: list[RequestRecord], t_lo: float, t_hi: float, mean_output: float) -> dict[str, float]:
    """What a closed-loop burst carried between ``t_lo`` and ``t_hi`` (past its ramp-up).

    ``rps`` counts output tokens streamed in the window (each chunk carries its share of
    its request's tokens) over ``mean_output``, the mix's mean output per request: smoother
    than counting completions when requests last seconds and finish in waves (the
    completions are ``completed_rps``).
    """
    span = t_hi - t_lo
    if span <= 0:
        raise ValueError("empty measuring window")
    ok = [r for r in records if r.ok and r.output_tokens > 0]
    tokens = 0.0
    for r in ok:
        times = _chunk_times(r)
        share = r.output_tokens / len(times)
        tokens += share * sum(1 for t in times if t_lo < t <= t_hi)
    completed = sum(1 for r in ok if t_lo < r.start + r.e2e <= t_hi)
    return {"rps": tokens / span / mean_output, "completed_rps": completed / span, "out_tok_s": tokens / span,
            "sent": len(records), "failed": len(records) - len(ok)}


def imbalance_bound(mult: float) -> float:
    """The best flowkv / 2:2 window ratio under a sustained imbalance at ``mult`` x the 2:2
    capacity, for a scheduler that flips at once and for free: 2:2 carries 1.0x of the side in
    demand, 3:1 (or 1:3) carries up to 1.5x."""
    return max(1.0, min(mult, 1.5))


def answer_check(specs: list[RequestSpec], records: list[RequestRecord]) -> dict[str, Any]:
    """Was every request answered once, in full?

    In full: HTTP 200, no error, the usage reports the prompt's and the requested output's
    token counts, and no more text chunks arrived than tokens were asked for (a chunk sent
    twice would show as one too many).
    """
    by_index = {r.index: r for r in records}
    full = partial = 0
    failures: dict[str, int] = {}
    for s in specs:
        r = by_index.get(s.index)
        if r is None or not r.ok:
            key = "missing" if r is None else (r.failure_key if r.error != "cut off" else "cut_off")
            failures[key] = failures.get(key, 0) + 1
            continue
        chunks = 1 + len(r.itl)
        if r.output_tokens == s.output_len and r.prompt_tokens == s.input_len and chunks <= s.output_len:
            full += 1
        else:
            partial += 1
    return {"requests": len(specs), "records": len(records), "answered_in_full": full, "wrong_or_partial": partial,
            "not_answered": dict(sorted(failures.items())),
            "all_once_in_full": full == len(specs) and len(by_index) == len(records) == len(specs)}


@dataclass(frozen=True)
class Target:
    name: str
    ratio: float | None
    threshold: float | None  # None: reported only
    detail: str

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "n/a"
        if self.threshold is None:
            return "info"
        return "PASS" if self.ratio >= self.threshold else "FAIL"


def targets(rows: list[dict[str, Any]], key: str = "window_rps") -> list[Target]:
    """The scheduler's targets on ``key``: flowkv >= 1.15x fixed 1:1 under imbalance, >= 0.95x the
    best fixed split in every scenario; flowkv / round_robin reported in every scenario."""
    out: list[Target] = []
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    for sc in scenarios:
        by = {r["policy"]: r.get(key) for r in rows if r["scenario"] == sc}
        flow = by.get("flowkv")
        if sc.startswith("imbalance"):
            base = by.get(BASELINE)
            out.append(Target(f"{sc}: flowkv / {BASELINE}", _ratio(flow, base), IMBALANCE_GAIN,
                              f"{_fmt(flow)} / {_fmt(base)}"))
        fixed = {p: v for p, v in by.items() if p.startswith("fixed:") and v is not None}
        best = max(fixed, key=lambda p: fixed[p]) if fixed else None
        out.append(Target(f"{sc}: flowkv / best fixed ({best or '-'})", _ratio(flow, fixed.get(best) if best else None),
                          BEST_FIXED_SHARE, f"{_fmt(flow)} / {_fmt(fixed.get(best) if best else None)}"))
        rr = by.get("round_robin")
        out.append(Target(f"{sc}: flowkv / round_robin", _ratio(flow, rr), None, f"{_fmt(flow)} / {_fmt(rr)}"))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def roles_label(roles: list[str]) -> str:
    """["decode", "prefill", "prefill", "decode"] -> "2P 2D"."""
    counts = {r: roles.count(r) for r in ("prefill", "decode", "hybrid")}
    return " ".join(f"{n}{r[0].upper()}" for r, n in counts.items() if n) or "-"


BUSY = 0.85  # cores: a single-threaded process this busy is (nearly) saturated


def busy_processes(rows: list[dict[str, Any]]) -> list[str]:
    """``scenario/policy: gateway 0.97`` for every one-thread process near a full core (not the nodes)."""
    out = []
    for r in rows:
        for name, used in (r.get("cpu_util") or {}).items():
            if name in ("gateway", "scheduler", "loadgen") and used >= BUSY:
                out.append(f"{r['scenario']}/{r['policy']}: {name} {used:.2f}")
    return out


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """results.md: setup, calibration, the same-run table and the targets."""
    cal = meta.get("calibration", {})
    setup = (f"Machine: {meta.get('machine', '')}; pool {meta.get('cpu_pool', '')}; "
             f"{'parallel' if meta.get('cpu_plan', {}).get('parallel') else 'sequential'} clusters, "
             f"{meta.get('node_threads')} torch thread(s) per node. Command: `{meta.get('command', '')}`")
    lines = [f"# Scheduler on real 4-node CPU clusters ({meta.get('date', '')})", "", setup, ""]
    if cal.get("capacity"):
        lines += ["Calibration (2:2 cluster, closed-loop bursts): " + ", ".join(
            f"{k} {v:.2f} req/s" for k, v in cal["capacity"].items()), ""]
    if meta.get("phases"):
        lines += ["Scenario rates: " + "; ".join(
            f"{sc} " + ", ".join(f"{p['mix']} {p['rate']:.2f} req/s x {p['duration_s']:g} s" for p in phases)
            for sc, phases in meta["phases"].items()), ""]
    if meta.get("multipliers"):
        bound = imbalance_bound(meta["multipliers"]["imbalance"])
        lines += [(f"At these rates a scheduler that flipped at once and for free could reach flowkv / fixed:1:1 = "
                   f"{bound:.3f} under imbalance (see `imbalance_bound`)."), ""]
    lines += [("| scenario | policy | window req/s | req/s to last | out tok/s | TTFT p50 / p99 s | "
               "TPOT p50 / p99 ms | in full | flips | roles before -> after |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ans = r.get("answers", {})
        lines.append(
            f"| {r['scenario']} | {r['policy']} | {_fmt(r.get('window_rps'))} | {_fmt(r.get('request_throughput'))} | "
            f"{r.get('output_throughput', 0):.0f} | {_s(r['ttft']['p50'])} / {_s(r['ttft']['p99'])} | "
            f"{_ms(r['tpot']['p50'])} / {_ms(r['tpot']['p99'])} | "
            f"{ans.get('answered_in_full', '-')}/{ans.get('requests', '-')} | {r.get('flips', '-')} | "
            f"{roles_label(r.get('roles_before', []))} -> {roles_label(r.get('roles_after', []))} |")
    lines += ["", "Targets (window req/s; in brackets the same ratio on req/s to the last completion):", ""]
    late = {t.name: t for t in targets(rows, "request_throughput")}
    for t in targets(rows):
        other = late.get(t.name)
        extra = f" [{other.ratio:.3f}]" if other is not None and other.ratio is not None else ""
        bound = f" (>= {t.threshold:g})" if t.threshold is not None else ""
        ratio = "-" if t.ratio is None else f"{t.ratio:.3f}"
        lines.append(f"- **{t.verdict}** {t.name} = {ratio}{extra}{bound}: {t.detail}")
    busy = busy_processes(rows)
    if busy:
        lines += ["", f"Busy processes (>= {BUSY:g} core on average over the run; a gateway or load generator here "
                      "caps the cluster, not its nodes): " + ", ".join(busy)]
    bad = [f"{r['scenario']}/{r['policy']}" for r in rows if not r.get("answers", {}).get("all_once_in_full")]
    lines += ["", "Every request answered once in full: " + ("yes, in every run." if not bad else
                                                              "no: " + ", ".join(bad) + " (see answers in results.json).")]
    if meta.get("skipped"):
        lines += ["", "Skipped (deadline): " + ", ".join(meta["skipped"])]
    return "\n".join(lines) + "\n"


def plot(path: str, rows: list[dict[str, Any]], key: str = "window_rps") -> bool:
    """Grouped bars: ``key`` per scenario, one bar per policy. False without matplotlib or rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    if not scenarios or not policies:
        return False
    by = {(r["scenario"], r["policy"]): r.get(key) or 0.0 for r in rows}
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, pol in enumerate(policies):
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(scenarios))]
        ax.bar(xs, [by.get((sc, pol), 0.0) for sc in scenarios], width, label=pol)
    ax.set_xticks(range(len(scenarios)), scenarios)
    ax.set_ylabel("requests/s completed in the window")
    ax.set_title("Real 4-node CPU clusters, same run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
