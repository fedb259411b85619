"""NATS authentication and API keys wired through every service, with no secret leaking.

- ``flowkv up --nats-token T --api-key K``: the embedded broker requires T, every
  service connects with it (environment only), the gateway requires K; neither secret
  appears in any process's command line (``/proc/*/cmdline``) or in any log line.
- a service given a wrong token (or password) exits at once with a clear error instead
  of retrying forever, and does not print the secret either.
- user/password authentication: a scheduler process connects and answers with them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.reliability.cluster import MODEL, REPO, Cluster, _die_with_parent, poll
from services.common.natsserver import NatsServer, free_port

TOKEN = "tok-7f3a9c1e5b2d4f60a8c7"
API_KEY = "key-93b1e0d4c6a27f58e1"
WRONG = "wrong-token-5521aa"


def cmdlines() -> str:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out.append((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return "\n".join(out)


def run_service(module: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLOWKV_")}
    return subprocess.run([sys.executable, "-m", module], env=base | {"PYTHONPATH": str(REPO)} | env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=_die_with_parent)


@pytest.mark.timeout(400)
async def test_flowkv_up_with_nats_token_and_api_key_serves_and_never_shows_them(tmp_path):
    port, nats_port = free_port(), free_port()
    log_path = tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWKV_")} | {
        "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        # The same settings as --nats-token / --api-key, kept off flowkv up's own command line.
        "FLOWKV_UP_NATS_TOKEN": TOKEN, "FLOWKV_UP_API_KEY": API_KEY}
    argv = [sys.executable, "-m", "services.cli", "up", "--model", MODEL, "--port", str(port),
            "--nats-port", str(nats_port)]
    with open(log_path, "wb") as log:
        up = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            async def ready() -> bool:
                assert up.poll() is None, log_path.read_text()
                async with s.get(url + "/ready") as r:
                    return r.status == 200 and len((await r.json())["nodes"]) == 2
            await poll(ready, 240, lambda: f"flowkv up not ready:\n{log_path.read_text()[-3000:]}")
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
            async with s.post(url + "/v1/completions", json=body) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
            async with s.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {WRONG}"}) as r:
                assert r.status == 401
            async with s.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["usage"]["completion_tokens"] == 4
            procs = cmdlines().splitlines()
            leaked = [line for line in procs if TOKEN in line or API_KEY in line]
            assert not leaked, leaked
            assert sum("services.node" in line for line in procs) >= 2 and any("nats-server" in line for line in procs)

        # A service with a wrong token: a clear error and a non-zero exit, at once.
        started = time.monotonic()
        bad = run_service("services.scheduler", {"FLOWKV_NATS_URL": f"nats://127.0.0.1:{nats_port}",
                                                 "FLOWKV_NATS_TOKEN": WRONG})
        assert bad.returncode != 0
        out = bad.stdout + bad.stderr
        assert "refused the credentials" in out and "FLOWKV_NATS_TOKEN" in out, out[-2000:]
        assert "Traceback" not in out, out[-2000:]
        assert WRONG not in out and TOKEN not in out
        print(f"\nwrong token: exit {bad.returncode} after {time.monotonic() - started:.1f}s")
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    text = log_path.read_text()
    assert "scheduler" in text and "gateway" in text and "prefill-0" in text
    assert TOKEN not in text and API_KEY not in text


@pytest.mark.timeout(200)
async def test_user_password_auth_connects_and_a_wrong_password_fails_clearly(tmp_path):
    with NatsServer(user="flowkv", password="pw-44c0ffee") as server:
        c = Cluster(tmp_path, nats_user="flowkv", nats_password="pw-44c0ffee")
        c.nats = server
        sched = c._spawn("scheduler", "services.scheduler", ["--node-timeout-s", "1.5"])
        try:
            state = None

            async def answers() -> bool:
                nonlocal state
                state = await c.cluster_state()
                return True

            await poll(answers, 120, lambda: f"scheduler did not answer:\n{sched.log()[-2000:]}")
            assert state is not None and state.nodes == []
            bad = run_service("services.scheduler", {"FLOWKV_NATS_URL": server.url, "FLOWKV_NATS_USER": "flowkv",
                                                     "FLOWKV_NATS_PASSWORD": "not-the-password"})
            out = bad.stdout + bad.stderr
            assert bad.returncode != 0 and "refused the credentials" in out, out[-2000:]
            assert "not-the-password" not in out and "pw-44c0ffee" not in out + sched.log()
        finally:
            sched.stop()


def test_flowkv_up_hands_the_secrets_to_its_children_by_environment_only():
    from services.cli.plan import plan_cluster
    from services.cli.up import build_config

    plan = plan_cluster(build_config(model=MODEL, nats_token=TOKEN, api_key=API_KEY), base_env={})
    try:
        names = [c.name for c in plan.children]
        assert names == ["nats", "scheduler", "prefill-0", "decode-0", "gateway"]
        for child in plan.children:
            assert not any(TOKEN in a or API_KEY in a for a in child.argv), child.argv
            if child.name != "nats":
                assert child.env["FLOWKV_NATS_TOKEN"] == TOKEN
            assert ("FLOWKV_GATEWAY_API_KEYS" in child.env) == (child.name == "gateway")
        assert plan.child("gateway").env["FLOWKV_GATEWAY_API_KEYS"] == API_KEY
        conf = plan.files[0]
        assert oct(conf.stat().st_mode & 0o777) == "0o600" and f'token: "{TOKEN}"' in conf.read_text()
    finally:
        plan.cleanup()
