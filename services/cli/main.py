"""Entry point of the ``flowkv`` command and the registry of its subcommands.

A subcommand is a module listed in :data:`SUBCOMMANDS`. It is imported only when it
runs (so ``flowkv --help`` stays fast and a broken subcommand cannot break the others)
and defines::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...          # the exit status

To add one (``bench``, ``sim``), add a line to :data:`SUBCOMMANDS` or call
:func:`register` before :func:`main`. Service subcommands (``gateway``, ``scheduler``,
``node``) are not parsed here: every argument after the name goes to the service's own
``__main__`` unchanged, so ``flowkv node --help`` prints the node's real flags.
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    """One ``flowkv <name>`` subcommand.

    Args:
        module: module that defines ``add_arguments(parser)`` and ``run(args) -> int``,
            or, when ``service`` is true, the service package whose ``__main__`` runs.
        help: one line for ``flowkv --help``.
        service: pass the remaining arguments to ``python -m <module>`` unparsed.
    """

    module: str
    help: str
    service: bool = False


SUBCOMMANDS: dict[str, Subcommand] = {
    "up": Subcommand("services.cli.up", "run a whole cluster on this machine (NATS, scheduler, gateway, nodes)"),
    "gateway": Subcommand("services.gateway", "run the OpenAI-compatible HTTP gateway", service=True),
    "scheduler": Subcommand("services.scheduler", "run the scheduler (placement, roles)", service=True),
    "node": Subcommand("services.node", "run one inference node (prefill, decode or hybrid)", service=True),
    "status": Subcommand("services.cli.status", "show the cluster as the scheduler sees it"),
    "sim": Subcommand("libs.sim", "simulate a cluster with the real scheduler core (policy sweeps)", service=True),
    "bench": Subcommand("services.cli.bench", "benchmark an OpenAI-compatible server (TTFT, TPOT, throughput, goodput)"),
}


def register(name: str, subcommand: Subcommand) -> None:
    """Add (or replace) a subcommand; for plug-ins and tests."""
    SUBCOMMANDS[name] = subcommand


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<10} {sub.help}" for name, sub in SUBCOMMANDS.items()]
    return argparse.ArgumentParser(
        prog="flowkv",
        description="FlowKV: disaggregated LLM inference (prefill and decode on separate nodes).",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `flowkv <command> --help` for a command's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def run_service(module: str, argv: list[str], prog: str) -> int:
    """Run ``python -m <module> argv...`` in this process; returns its exit status."""
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``flowkv`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        top.add_argument("command", choices=sorted(SUBCOMMANDS), help="what to run")
        top.parse_args(argv[:1])  # prints help / a usage error and exits
        return 2
    name, rest = argv[0], argv[1:]
    sub = SUBCOMMANDS[name]
    if sub.service:
        return run_service(sub.module, rest, prog=f"flowkv {name}")
    module = importlib.import_module(sub.module)
    parser = argparse.ArgumentParser(prog=f"flowkv {name}", description=sub.help)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
