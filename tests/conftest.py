"""Fixtures shared by the whole suite."""

from __future__ import annotations

import contextlib
import os

import pytest

# Two cores here and in CI: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(2)

from services.common.natsserver import NatsServer  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed test of a multi-process cluster reports what each of its services logged
    last: the scheduler's events, a node's warnings. A failure in CI is then readable
    from its output alone."""
    rep = yield
    cluster = getattr(item, "funcargs", {}).get("cluster")
    services = getattr(cluster, "services", None)
    if rep.failed and isinstance(services, dict):
        for name, service in services.items():
            log = getattr(service, "log", None)
            if callable(log):
                with contextlib.suppress(Exception):
                    tail = [line for line in log().splitlines() if "DEBUG" not in line][-LOG_TAIL_LINES:]
                    rep.sections.append((f"{name} log, last {len(tail)} lines", "\n".join(tail)))
    return rep


LOG_TAIL_LINES = 40


@pytest.fixture
def nats_server():
    """A real nats-server on a free loopback port, stopped after the test."""
    with NatsServer() as server:
        yield server
