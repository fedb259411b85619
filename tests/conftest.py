"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os

import pytest

# Two cores here and in CI: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(2)

from services.common.natsserver import NatsServer  # noqa: E402


@pytest.fixture
def nats_server():
    """A real nats-server on a free loopback port, stopped after the test."""
    with NatsServer() as server:
        yield server
