"""One real cluster for the whole observability suite (starting one costs seconds)."""

from __future__ import annotations

import pytest

from services.common.natsserver import NatsServer
from tests.observability.cluster import Cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("observability")
    with NatsServer() as nats:
        c = Cluster(nats_url=nats.url, trace_file=tmp / "traces.jsonl", log_dir=tmp)
        try:
            c.start()
            yield c
        finally:
            c.stop()
