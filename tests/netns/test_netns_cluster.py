"""A FlowKV cluster spread over network namespaces: NATS and KV cross veth links.

Four namespaces hang off one bridge in the root namespace (10.77.0.1/24, test addresses
that exist only inside this test): ``ctl`` (nats-server, scheduler, gateway), ``p``
(prefill node), ``d1`` and ``d2`` (decode nodes). Every node is forced onto the ``tcp``
KV transport and listens on its own namespace's address, so a hand-off crosses the
bridge. A request through the gateway is served and the prefill node counts tcp bytes.
Then ``d1``'s link goes down: the scheduler drops d1 after its report timeout and the
next requests are placed on ``d2`` and served, no hang. The namespaces, links and
processes are removed in every case.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time

import aiohttp
import msgspec
import nats
import pytest

from libs.protocol import messages as m
from libs.protocol import subjects
from tests.fuzz.procs import Cluster, scrape

NET = "10.77.0"
BRIDGE_ADDR = f"{NET}.1"
HOSTS = {"ctl": 2, "p": 3, "d1": 4, "d2": 5}
GATEWAY_PORT, NATS_PORT, METRICS_PORT = 8080, 4222, 9100  # in their own namespaces: no clash possible


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, bridge)"
    if shutil.which("ip") is None:
        return "iproute2 `ip` is not installed"
    probe = f"fkvprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode != 0:
        return f"ip netns is unavailable: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Net:
    """Namespaces named ``fkv<pid><host>`` on a bridge ``fkb<pid>``; ``down()`` removes everything."""

    def __init__(self) -> None:
        tag = str(os.getpid() % 100000)
        self.bridge = f"fkb{tag}"
        self.ns = {h: f"fkv{tag}{h}" for h in HOSTS}
        self.veth = {h: f"fv{tag}{h}" for h in HOSTS}  # root-side ends (<= 15 chars)

    def up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for host, k in HOSTS.items():
            ns, veth = self.ns[host], self.veth[host]
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", ns, "addr", "add", f"{NET}.{k}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def cut(self, host: str) -> None:
        sh("ip", "link", "set", self.veth[host], "down")

    def down(self) -> None:
        for host in HOSTS:
            subprocess.run(["ip", "netns", "del", self.ns[host]], capture_output=True)
            subprocess.run(["ip", "link", "del", self.veth[host]], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def exec(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]


@pytest.fixture
def netns_cluster(tmp_path):
    net = Net()
    cluster = Cluster(tmp_path)
    try:
        net.up()
        ctl = f"{NET}.{HOSTS['ctl']}"
        cluster.start_nats(ctl, NATS_PORT, prefix=net.exec("ctl"))
        cluster.start_scheduler("--node-timeout-s", "3", prefix=net.exec("ctl"))
        for host, role in (("p", "prefill"), ("d1", "decode"), ("d2", "decode")):
            addr = f"{NET}.{HOSTS[host]}"
            cluster.start_node(host, role, "--kv-host", addr, "--kv-transport", "tcp",
                               "--metrics-host", addr, "--metrics-port", str(METRICS_PORT), "--transfer-timeout-s", "10",
                               "--kv-alloc-timeout-s", "3", prefix=net.exec(host))
        cluster.start_gateway(GATEWAY_PORT, "--stall-timeout-s", "10", "--submit-timeout-s", "3",
                              host=ctl, prefix=net.exec("ctl"))
        base = f"http://{ctl}:{GATEWAY_PORT}"
        cluster.wait_ready(base, {"p", "d1", "d2"}, timeout=240)
        yield net, cluster, base
    finally:
        cluster.stop()
        net.down()


async def complete(session: aiohttp.ClientSession, base: str, request_id: str) -> dict:  # type: ignore[type-arg]
    body = {"model": "tiny", "prompt": [(7 * i + 3) % 4000 + 50 for i in range(24)], "max_tokens": 5,
            "temperature": 0, "ignore_eos": True}
    headers = {"X-Request-Id": request_id}
    async with session.post(base + "/v1/completions", json=body, headers=headers,
                            timeout=aiohttp.ClientTimeout(total=60)) as resp:
        assert resp.status == 200, await resp.text()
        return json.loads(await resp.text())


async def cluster_nodes(nc) -> set[str]:  # type: ignore[no-untyped-def]
    reply = await nc.request(subjects.sched_cluster(), m.encode(m.ClusterQuery()), timeout=2)
    return {n.node_id for n in msgspec.msgpack.decode(reply.data, type=m.ClusterState).nodes}


async def test_kv_over_tcp_across_namespaces_and_a_cut_decode_link(netns_cluster) -> None:
    net, cluster, base = netns_cluster
    nc = await nats.connect(f"nats://{NET}.{HOSTS['ctl']}:{NATS_PORT}")
    placements: dict[str, str] = {}

    async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
        ev = m.decode(msg.data)
        if isinstance(ev, m.SchedEvent) and ev.kind is m.EventKind.PLACEMENT:
            placements[ev.request_id] = ev.decode_node

    await nc.subscribe(subjects.sched_events(), cb=on_event)
    try:
        async with aiohttp.ClientSession() as session:
            first = await complete(session, base, "netns-before")
            assert first["usage"]["completion_tokens"] == 5
            p_metrics = f"http://{NET}.{HOSTS['p']}:{METRICS_PORT}/metrics"
            assert scrape(p_metrics, "flowkv_node_kv_transfer_bytes_total") > 0
            assert scrape(p_metrics, "flowkv_node_kv_transfer_bytes_total", 'transport="tcp"') > 0

            net.cut("d1")
            deadline = time.monotonic() + 30  # bounds a scheduler that never notices
            while "d1" in await cluster_nodes(nc):
                assert time.monotonic() < deadline, "the scheduler still lists d1 after its link went down"
                await asyncio.sleep(0.5)
            assert await cluster_nodes(nc) == {"p", "d2"}

            started = time.monotonic()
            after = [await complete(session, base, f"netns-after-{i}") for i in range(3)]
            print(f"3 requests after the cut in {time.monotonic() - started:.2f}s")
        assert [a["usage"]["completion_tokens"] for a in after] == [5, 5, 5]
        # Greedy and the same prompt: the same text on either decode node.
        assert {a["choices"][0]["text"] for a in after} == {first["choices"][0]["text"]}
        await nc.flush()
        assert [placements.get(f"netns-after-{i}") for i in range(3)] == ["d2", "d2", "d2"]
        assert [n for n in cluster.dead() if n != "d1"] == []
    finally:
        await nc.close()
