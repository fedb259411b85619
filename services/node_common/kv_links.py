"""Per-peer KV link figures: what this node's hand-offs to each decode node took.

Every finished send is one sample (bytes, seconds on the sender). Per peer the samples
are kept as exponentially weighted sums (the newest weighs ``ALPHA``), from which:

- with transfers of different sizes (sizes spread by at least ``MIN_SPREAD`` of their
  mean), a weighted least-squares line ``seconds = latency + bytes / bandwidth`` splits the
  fixed per-transfer cost from the rate;
- otherwise, or when the fit is not physical (negative latency, no slope), the latency is
  0 and the bandwidth is weighted bytes over weighted seconds: the effective rate of
  transfers of the size seen, fixed cost included.

The figures describe transfers as they ran, contention between concurrent hand-offs
included; failed transfers are not counted. Only the ``MAX_PEERS`` most recently used
peers are kept, so the load report stays small.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from libs.protocol.messages import KVLink

ALPHA = 0.2
MAX_PEERS = 64
MIN_SPREAD = 0.1


@dataclass
class _Sums:
    """Exponentially weighted sums of one peer's samples (x: bytes, y: seconds)."""

    transfers: int = 0
    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, x: float, y: float) -> None:
        keep = 1.0 - ALPHA
        self.transfers += 1
        self.w = keep * self.w + 1.0
        self.x = keep * self.x + x
        self.y = keep * self.y + y
        self.xx = keep * self.xx + x * x
        self.xy = keep * self.xy + x * y

    def figures(self) -> tuple[float, float]:
        """(bandwidth in bytes/s, latency in s) of the samples so far."""
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if self.transfers >= 2 and var > (MIN_SPREAD * mx) ** 2:
            slope = (self.xy / self.w - mx * my) / var
            latency = my - slope * mx
            if slope > 0 and latency >= 0:
                return 1.0 / slope, latency
        return mx / my, 0.0


class KVLinkTable:
    """The link figures of one sending node, by decode peer id."""

    def __init__(self, max_peers: int = MAX_PEERS) -> None:
        self.max_peers = max_peers
        self._peers: OrderedDict[str, _Sums] = OrderedDict()

    def record(self, peer: str, num_bytes: int, seconds: float) -> None:
        """Add one finished hand-off of ``num_bytes`` to ``peer`` that took ``seconds``.

        Samples that moved nothing or took no measurable time are ignored.
        """
        if num_bytes <= 0 or seconds <= 0:
            return
        sums = self._peers.pop(peer, None) or _Sums()
        sums.add(float(num_bytes), seconds)
        self._peers[peer] = sums  # most recent last
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)

    def snapshot(self) -> list[KVLink]:
        """The figures of every kept peer, least recently used first."""
        out = []
        for peer, sums in self._peers.items():
            bandwidth, latency = sums.figures()
            out.append(KVLink(peer=peer, bandwidth_bytes_per_s=bandwidth, latency_s=latency,
                              transfers=sums.transfers))
        return out
