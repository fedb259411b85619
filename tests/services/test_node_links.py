"""The sender's per-peer KV link figures (services/node_common/kv_links.py), on known transfers."""

from __future__ import annotations

import pytest

from libs.protocol.messages import KVLink
from services.node_common.kv_links import KVLinkTable

MB = 1_000_000


def _only(table: KVLinkTable) -> KVLink:
    (link,) = table.snapshot()
    return link


def test_one_transfer_is_its_own_rate() -> None:
    table = KVLinkTable()
    table.record("d0", 4 * MB, 0.01)
    assert _only(table) == KVLink(peer="d0", bandwidth_bytes_per_s=4e8, latency_s=0.0, transfers=1)


def test_same_size_transfers_give_the_effective_rate() -> None:
    # Without sizes to tell them apart the fixed cost stays inside the rate: latency 0.
    table = KVLinkTable()
    for seconds in (0.01, 0.02, 0.01):
        table.record("d0", 4 * MB, seconds)
    link = _only(table)
    # Weights 0.64, 0.8, 1 (newest): 4 MB x 2.44 / (0.0064 + 0.016 + 0.01) s.
    assert link.bandwidth_bytes_per_s == pytest.approx(4 * MB * 2.44 / 0.0324)
    assert (link.latency_s, link.transfers) == (0.0, 3)


def test_small_and_large_transfers_split_latency_from_bandwidth() -> None:
    # 1 ms per transfer plus 1 GB/s: 1 MB takes 2 ms, 10 MB 11 ms.
    table = KVLinkTable()
    for num_bytes in (1 * MB, 10 * MB, 1 * MB, 10 * MB):
        table.record("d0", num_bytes, 0.001 + num_bytes / 1e9)
    link = _only(table)
    assert link.bandwidth_bytes_per_s == pytest.approx(1e9)
    assert link.latency_s == pytest.approx(0.001)
    assert link.transfers == 4


def test_an_unphysical_fit_falls_back_to_the_effective_rate() -> None:
    # The larger transfer was quicker (noise, contention): no positive slope to trust.
    table = KVLinkTable()
    table.record("d0", 1 * MB, 0.004)
    table.record("d0", 2 * MB, 0.002)
    link = _only(table)
    assert link.bandwidth_bytes_per_s == pytest.approx((0.8 * MB + 2 * MB) / (0.8 * 0.004 + 0.002))
    assert link.latency_s == 0.0


def test_recent_transfers_weigh_most() -> None:
    table = KVLinkTable()
    table.record("d0", 10 * MB, 10 * MB / 1e9)  # 1 GB/s
    table.record("d0", 10 * MB, 10 * MB / 1e8)  # the link slowed to 100 MB/s
    # 1.8 weighted transfers over 0.8 x 10 ms + 100 ms.
    assert _only(table).bandwidth_bytes_per_s == pytest.approx(1.8 * 10 * MB / 0.108)


def test_peers_are_kept_apart_and_bounded() -> None:
    table = KVLinkTable(max_peers=3)
    for i in range(4):
        table.record(f"d{i}", MB, 0.001 * (i + 1))
    table.record("d1", MB, 0.001)  # d1 used again: now the most recent
    table.record("d9", 0, 0.001)  # nothing moved: ignored
    table.record("d9", MB, 0.0)  # no measurable time: ignored
    links = table.snapshot()
    assert [link.peer for link in links] == ["d2", "d3", "d1"]  # d0 dropped, least recently used
    assert [link.transfers for link in links] == [1, 1, 2]
    assert links[0].bandwidth_bytes_per_s == pytest.approx(MB / 0.003)
