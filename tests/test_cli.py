"""The ``flowkv`` command: help, the subcommand registry, ``up``'s plan and process handling,
``status`` against a real scheduler, and ``flowkv up`` end to end with real processes."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest

from libs.protocol import messages, subjects
from libs.protocol.messages import ClusterState, EventKind, LoadReport, NodeState, Role, SchedEvent
from services.cli import main as cli
from services.cli import status, up
from services.cli.plan import STAGE_GATEWAY, STAGE_NATS, STAGE_NODES, STAGE_SCHEDULER, plan_cluster
from services.cli.supervisor import LogSink, Supervisor
from services.common.natsserver import free_port

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- help and registry


def test_flowkv_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "services.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("up", "gateway", "scheduler", "node", "status"):
        assert f"\n  {name} " in out.stdout


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_subcommand_help_exits_0(name, capsys):
    with pytest.raises(SystemExit) as exc:
        code = cli.main([name, "--help"])
        raise SystemExit(code)
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["nope"])
    assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_registered_subcommand_runs_with_its_own_arguments(monkeypatch):
    seen = []
    plugin = types.ModuleType("flowkv_test_plugin")
    plugin.add_arguments = lambda p: p.add_argument("--rate", type=float, default=1.0)
    plugin.run = lambda args: seen.append(args.rate) or 7
    monkeypatch.setitem(sys.modules, "flowkv_test_plugin", plugin)
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))
    cli.register("bench", cli.Subcommand("flowkv_test_plugin", "measure"))
    assert cli.main(["bench", "--rate", "2.5"]) == 7
    assert seen == [2.5]


def test_service_subcommand_passes_arguments_unparsed(monkeypatch):
    captured = {}

    def fake_run_module(module, run_name, alter_sys):
        captured.update(module=module, argv=list(sys.argv), run_name=run_name)
        raise SystemExit(3)

    monkeypatch.setattr(cli.runpy, "run_module", fake_run_module)
    assert cli.main(["node", "--node-id", "p0", "--role", "prefill"]) == 3
    assert captured == {"module": "services.node", "argv": ["flowkv node", "--node-id", "p0", "--role", "prefill"],
                        "run_name": "__main__"}


# ---------------------------------------------------------------- flowkv up: configuration and plan


def _up_config(argv: list[str], env: dict[str, str] | None = None, monkeypatch=None) -> up.UpConfig:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return up.build_config(parser.parse_args(argv))


def test_up_defaults(monkeypatch):
    for key in list(os.environ):
        if key.startswith("FLOWKV_UP_"):
            monkeypatch.delenv(key)
    cfg = _up_config([])
    assert (cfg.model, cfg.device, cfg.port, cfg.prefill_nodes, cfg.decode_nodes, cfg.colocated) == (
        "smollm2", "cpu", 8000, 1, 1, 0)
    assert cfg.nats_url == "" and cfg.num_nodes == 2


def test_up_flags_win_over_env(monkeypatch):
    monkeypatch.setenv("FLOWKV_UP_PORT", "9100")
    monkeypatch.setenv("FLOWKV_UP_DECODE_NODES", "3")
    cfg = _up_config(["--port", "9200", "--prefill-nodes", "2", "--model", "tiny", "--policy", "round_robin"])
    assert (cfg.port, cfg.prefill_nodes, cfg.decode_nodes, cfg.model, cfg.policy) == (9200, 2, 3, "tiny", "round_robin")
    assert cfg.num_nodes == 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prefill-nodes", "0"], "at least one prefill and one decode node"),
        (["--port", "70000"], "port must be in 1..65535"),
        (["--colocated", "-1"], "node counts must be >= 0"),
        (["--port", "http"], "invalid value for port"),
    ],
)
def test_up_rejects_bad_settings(argv, message):
    with pytest.raises(SystemExit) as exc:
        _up_config(argv)
    assert message in str(exc.value)


def test_plan_disaggregated_with_token_keeps_secrets_off_command_lines():
    cfg = up.UpConfig(model="tiny", port=8123, prefill_nodes=2, decode_nodes=1, nats_token="s3cret",
                      api_key="k3y", policy="least_loaded")
    plan = plan_cluster(cfg, base_env={"PATH": os.environ["PATH"]})
    try:
        names = [c.name for c in plan.children]
        assert names == ["nats", "scheduler", "prefill-0", "prefill-1", "decode-0", "gateway"]
        stages = [c.stage for c in plan.children]
        assert stages == [STAGE_NATS, STAGE_SCHEDULER, STAGE_NODES, STAGE_NODES, STAGE_NODES, STAGE_GATEWAY]
        for child in plan.children:
            assert not any("s3cret" in a or "k3y" in a for a in child.argv), child.name
        conf = Path(plan.child("nats").argv[-1])
        assert oct(conf.stat().st_mode & 0o777) == "0o600"
        assert 'authorization { token: "s3cret" }' in conf.read_text()
        for name in names[1:]:
            assert plan.child(name).env["FLOWKV_NATS_URL"] == plan.nats_url
            assert plan.child(name).env["FLOWKV_NATS_TOKEN"] == "s3cret"
        assert plan.child("gateway").env["FLOWKV_GATEWAY_API_KEYS"] == "k3y"
        assert "FLOWKV_GATEWAY_API_KEYS" not in plan.child("prefill-0").env
        assert plan.child("prefill-1").argv[3:] == ["--node-id", "prefill-1", "--role", "prefill", "--model", "tiny",
                                                     "--device", "cpu", "--log-level", "info", "--metrics-port", "8126",
                                                     "--metrics-host", "127.0.0.1"]
        assert plan.child("scheduler").argv[3:] == ["--log-level", "info", "--metrics-port", "8124",
                                                     "--metrics-host", "127.0.0.1", "--policy", "least_loaded"]
        assert plan.child("gateway").argv[3:] == ["--host", "127.0.0.1", "--port", "8123", "--model", "tiny",
                                                   "--log-level", "info"]
    finally:
        plan.cleanup()
    assert not conf.exists()


def test_plan_moves_a_derived_metrics_port_that_is_taken():
    # gateway port + 1.. are a default, not a request: a port another process holds is
    # replaced by a free one (a node that cannot bind its /metrics port dies at start).
    import socket

    from services.common.natsserver import listen_port

    with socket.socket() as held:
        held.bind(("0.0.0.0", listen_port("0.0.0.0")))  # below the ephemeral range
        taken = held.getsockname()[1]
        cfg = up.UpConfig(model="tiny", port=taken - 2, prefill_nodes=1, decode_nodes=1, nats_url="nats://b:4222")
        plan = plan_cluster(cfg, base_env={})
        ports = {c.name: int(c.argv[c.argv.index("--metrics-port") + 1]) for c in plan.children
                 if "--metrics-port" in c.argv}
        assert ports["prefill-0"] != taken and len(set(ports.values())) == 3
        # Asked for explicitly: kept as asked (the service then fails loudly on it).
        cfg = up.UpConfig(model="tiny", port=8000, metrics_port=taken - 1, prefill_nodes=1, decode_nodes=1,
                          nats_url="nats://b:4222")
        argv = plan_cluster(cfg, base_env={}).child("prefill-0").argv
        assert argv[argv.index("--metrics-port") + 1] == str(taken)


def test_plan_moves_derived_metrics_ports_out_of_the_ephemeral_range():
    # A gateway port in the ephemeral range (a harness's free port) would put the nodes'
    # /metrics ports there too, where an outgoing connection can take one in the seconds
    # before its node binds it: they are taken below that range instead.
    from services.common.natsserver import ephemeral_low

    low = ephemeral_low()
    cfg = up.UpConfig(model="tiny", port=low + 100, prefill_nodes=2, decode_nodes=2, nats_url="nats://b:4222")
    plan = plan_cluster(cfg, base_env={})
    ports = [int(c.argv[c.argv.index("--metrics-port") + 1]) for c in plan.children if "--metrics-port" in c.argv]
    assert len(ports) == 5 and len(set(ports)) == 5 and all(p < low for p in ports)
    # Below the range, the derived ports stay as they are.
    plan = plan_cluster(up.UpConfig(model="tiny", port=8000, prefill_nodes=1, decode_nodes=1, nats_url="nats://b:4222"),
                        base_env={})
    assert plan.child("decode-0").argv[plan.child("decode-0").argv.index("--metrics-port") + 1] == "8003"


def test_plan_scheduler_replicas_on_a_nats_cluster_with_metrics_on_the_gateway_host():
    cfg = up.UpConfig(model="tiny", host="10.1.2.3", port=8123, schedulers=2, nats_cluster=3, nats_token="t0k")
    plan = plan_cluster(cfg, base_env={"PATH": os.environ["PATH"]})
    try:
        names = [c.name for c in plan.children]
        assert names == ["nats-0", "nats-1", "nats-2", "scheduler-0", "scheduler-1", "prefill-0", "decode-0", "gateway"]
        urls = plan.nats_url.split(",")
        assert len(set(urls)) == 3
        confs = [Path(plan.child(f"nats-{i}").argv[-1]).read_text() for i in range(3)]
        routes = [line for line in confs[0].splitlines() if line.startswith("cluster")][0]
        for i, conf in enumerate(confs):
            assert f"listen: {urls[i][len('nats://'):]}" in conf and f"server_name: nats-{i}" in conf
            assert "jetstream {" in conf and 'token: "t0k"' in conf
            assert [line for line in conf.splitlines() if line.startswith("cluster")][0].split("listen")[1].split(",")[1:] \
                == routes.split("listen")[1].split(",")[1:]  # the same three routes everywhere
        for name in names[3:]:
            assert plan.child(name).env["FLOWKV_NATS_URL"] == plan.nats_url  # every service knows every server
        for i in range(2):
            argv = plan.child(f"scheduler-{i}").argv
            assert argv[argv.index("--scheduler-id") + 1] == f"scheduler-{i}"
            assert argv[argv.index("--lease-replicas") + 1] == "3"
        for name in ("scheduler-0", "scheduler-1", "prefill-0", "decode-0"):
            argv = plan.child(name).argv
            assert argv[argv.index("--metrics-host") + 1] == "10.1.2.3"
        assert set(plan.metrics_urls) == {"scheduler-0", "scheduler-1", "prefill-0", "decode-0"}
        stores = list(plan.dirs)
        assert len(stores) == 3 and all(d.is_dir() for d in stores)
    finally:
        plan.cleanup()
    assert not any(d.exists() for d in stores)


def test_plan_colocated_on_an_external_nats():
    cfg = up.UpConfig(colocated=2, nats_url="nats://broker:4222", dtype="bfloat16")
    plan = plan_cluster(cfg, base_env={"OMP_NUM_THREADS": "1"})
    assert [c.name for c in plan.children] == ["scheduler", "hybrid-0", "hybrid-1", "gateway"]
    node = plan.child("hybrid-1")
    assert node.argv[-10:] == ["--device", "cpu", "--log-level", "info", "--metrics-port", "8003",
                               "--metrics-host", "127.0.0.1", "--dtype", "bfloat16"]
    assert node.argv[node.argv.index("--role") + 1] == "hybrid"
    assert node.env["FLOWKV_NATS_URL"] == "nats://broker:4222"
    assert node.env["OMP_NUM_THREADS"] == "1"  # the operator's setting is kept
    assert "FLOWKV_NATS_TOKEN" not in node.env
    assert plan.files == []


def test_banner_gives_url_and_curl_without_the_key():
    text = up.banner(up.UpConfig(model="tiny", host="0.0.0.0", port=8123, api_key="k3y"))
    assert "http://127.0.0.1:8123" in text
    assert "curl http://127.0.0.1:8123/v1/chat/completions" in text
    assert "$FLOWKV_UP_API_KEY" in text and "k3y" not in text


# ---------------------------------------------------------------- supervisor with real processes

_TRAP = (
    "import signal, sys, time\n"
    "def bye(*_):\n"
    "    open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "print('hello from', sys.argv[2], flush=True)\n"
    "while True: time.sleep(0.05)\n"
)


def test_supervisor_stops_stages_in_reverse_order_and_prefixes_logs(tmp_path):
    order = tmp_path / "order"
    out = io.StringIO()
    sink = LogSink(out)
    sup = Supervisor(sink)
    for name, stage in [("nats", 0), ("scheduler", 1), ("decode-0", 2), ("gateway", 3)]:
        sup.start(name, [sys.executable, "-c", _TRAP, str(order), name], dict(os.environ), stage)
    deadline = time.monotonic() + 60
    while out.getvalue().count("hello from") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sup.first_dead() is None
    sup.stop_all(timeout=30)
    assert order.read_text().split() == ["gateway", "decode-0", "scheduler", "nats"]
    assert [c.returncode() for c in sup.children] == [0, 0, 0, 0]
    assert "gateway     | hello from gateway" in out.getvalue().splitlines()


def test_supervisor_notices_a_dead_child_and_kills_a_stubborn_one():
    sup = Supervisor(LogSink(io.StringIO()))
    stubborn = sup.start("stubborn", [sys.executable, "-c",
                                      "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                      "print('ok', flush=True)\ntime.sleep(600)"], dict(os.environ), 0)
    dead = sup.start("dead", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), 1)
    dead.proc.wait(60)
    assert sup.first_dead() is dead and dead.returncode() == 3
    time.sleep(0.5)  # let the stubborn child install its SIGTERM handler
    sup.stop_all(timeout=0.5)
    assert stubborn.returncode() == -signal.SIGKILL


# ---------------------------------------------------------------- status


def _report(node_id: str, role: Role, state: NodeState = NodeState.READY, **kw) -> LoadReport:
    values = dict(node_id=node_id, role=role, state=state, seq=1, started_at=time.time(), model="tiny",
                  device="cpu", device_name="cpu", device_memory_bytes=0, max_model_len=2048, block_size=16,
                  kv_block_bytes=1024, total_blocks=512, free_blocks=500, largest_free_segment=500,
                  num_waiting=0, waiting_prefill_tokens=0, num_running=0, num_held=0,
                  prefill_tokens_per_s=0.0, decode_step_s=0.0)
    values.update(kw)
    return LoadReport(**values)


def test_status_table_and_events():
    state = ClusterState(
        policy="flowkv",
        nodes=[_report("prefill-0", Role.PREFILL, num_waiting=2, waiting_prefill_tokens=900),
               _report("decode-0", Role.DECODE, NodeState.DRAINING, num_running=3, free_blocks=12)],
        events=[SchedEvent(kind=EventKind.ROLE_FLIP, ts=0.0, node_id="decode-0", old_role=Role.DECODE,
                           new_role=Role.PREFILL, detail="requested")],
        num_waiting=4,
    )
    assert status.format_state(state, 0).splitlines()[0] == "policy: flowkv    nodes: 2    waiting for a node: 4"
    assert status.format_nodes(state).splitlines() == [
        "NODE       ROLE     STATE     DEVICE  RUNNING  WAITING  WAIT TOKENS  FREE/TOTAL BLOCKS",
        "decode-0   decode   draining  cpu     3        0        0            12/512",
        "prefill-0  prefill  ready     cpu     0        2        900          500/512",
    ]
    assert status.format_event(state.events[0]).endswith("role_flip node_id=decode-0 role=decode->prefill requested")
    joined = SchedEvent(kind=EventKind.NODE_UP, ts=0.0, node_id="prefill-0", new_role=Role.PREFILL, detail="cpu tiny")
    assert status.format_event(joined).endswith("node_up node_id=prefill-0 role=prefill cpu tiny")
    assert status.health(state, None) == (0, "scheduler up, 2 node(s)")
    assert status.health(state, "prefill-0") == (0, "node prefill-0 ready (prefill)")
    assert status.health(state, "decode-0") == (1, "node decode-0 is draining")
    assert status.health(state, "decode-9") == (1, "node decode-9 is not registered with the scheduler")


def _status_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    status.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_status_without_a_broker_exits_3(capsys):
    port = free_port()
    assert status.run(_status_args("--nats-url", f"nats://127.0.0.1:{port}", "--timeout", "0.5")) == 3
    assert f"no answer from the scheduler on nats://127.0.0.1:{port}" in capsys.readouterr().err


async def test_status_queries_a_real_scheduler(nats_server):
    from services.common.nats import NatsConfig, connect
    from services.scheduler.config import SchedulerConfig
    from services.scheduler.service import SchedulerService

    nc = await connect(NatsConfig(url=nats_server.url), "test-scheduler")
    service = SchedulerService(SchedulerConfig(policy="round_robin"), nc)
    await service.start()
    try:
        await nc.publish(subjects.node_load(), messages.encode(_report("decode-0", Role.DECODE)))
        await nc.flush()
        state = None
        for _ in range(100):
            state = await status.query(NatsConfig(url=nats_server.url), timeout=5)
            if state.nodes:
                break
        assert state.policy == "round_robin"
        assert [n.node_id for n in state.nodes] == ["decode-0"]
        # The scheduler took the lead (it is the only replica), then saw the node.
        assert [(e.kind, e.node_id) for e in state.events] == [(EventKind.LEADER, ""), (EventKind.NODE_UP, "decode-0")]
    finally:
        await service.close()
        await nc.close()


# ---------------------------------------------------------------- flowkv up, end to end


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _read_until(proc: subprocess.Popen, needle: str, seen: list[str]) -> None:
    for line in iter(proc.stdout.readline, ""):
        seen.append(line)
        if needle in line:
            return
    raise AssertionError("flowkv up ended before printing %r:\n%s" % (needle, "".join(seen[-60:])))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find orphans")
def test_flowkv_up_serves_and_stops_every_child():
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--model", "tiny", "--port", str(port),
         "--ready-timeout-s", "200", "--stop-timeout-s", "20", "--nats-token", "t0ken"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen: list[str] = []
    try:
        _read_until(proc, "FlowKV is ready at", seen)
        children = _children_of(proc.pid)
        assert len(children) == 5  # nats, scheduler, prefill-0, decode-0, gateway
        body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.loads(resp.read())
        assert reply["choices"][0]["text"] != ""
        assert reply["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        seen.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(seen)
    assert proc.returncode == 0, log[-4000:]
    assert [pid for pid in children if _alive(pid)] == []
    assert "t0ken" not in log
    assert "flowkv      | stopping (gateway, nodes, scheduler, nats)" in log


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_flowkv_up_exits_1_naming_the_child_that_died():
    port = free_port()
    # Only the node can fail here (an invalid block size is the node's own setting): with a
    # bad model name the gateway failed as well, and either could be reported first.
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--model", "tiny", "--colocated", "1",
         "--port", str(port), "--ready-timeout-s", "200"],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", FLOWKV_NODE_BLOCK_SIZE="0"),
        capture_output=True, text=True, timeout=220,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "hybrid-0 exited with status" in proc.stdout


def test_launch_waits_for_every_node_up_starts():
    # flowkv bench --launch used to wait for one node: with only the decode node reported,
    # the scheduler answered 429 to every request (seen in CI).
    from services.cli.launch import num_nodes_of

    assert num_nodes_of(["--model", "tiny"]) == 2
    assert num_nodes_of(["--colocated", "3", "--log-level", "warning"]) == 3
    assert num_nodes_of(["--prefill-nodes", "2", "--decode-nodes", "3"]) == 5
