"""Child processes of ``flowkv up``: started in stages, logs prefixed, stopped in reverse order.

Every child runs in its own session, so a Ctrl-C in the terminal reaches only
``flowkv up``, which then stops the children one stage at a time (gateway, nodes,
scheduler, NATS) instead of all of them at once. On Linux a child also gets SIGTERM
if ``flowkv up`` itself dies (``PR_SET_PDEATHSIG``), so nothing is left orphaned.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Child:
    """One child process with a name and a stop stage (lower stages stop last)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], stage: int) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.stage = stage
        self.proc: subprocess.Popen[bytes] | None = None
        self.expected_exit = False
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, sink: LogSink) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        assert self.proc.stdout is not None
        self._pump = threading.Thread(target=sink.pump, args=(self.name, self.proc.stdout), daemon=True)
        self._pump.start()

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def join_logs(self, timeout: float = 2.0) -> None:
        if self._pump is not None:
            self._pump.join(timeout)


class LogSink:
    """Writes the children's output line by line, each line prefixed with its child's name."""

    def __init__(self, out: IO[str], width: int = 12) -> None:
        self.out = out
        self.width = width
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        with self._lock:
            self.out.write(f"{name:<{self.width}}| {text}\n")
            self.out.flush()

    def pump(self, name: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.line(name, raw.decode("utf-8", "replace").rstrip("\n"))
        stream.close()


class Supervisor:
    """Starts children, notices the first unexpected death, and stops them in stage order."""

    def __init__(self, sink: LogSink) -> None:
        self.sink = sink
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], stage: int) -> Child:
        child = Child(name, argv, env, stage)
        self.children.append(child)
        child.start(self.sink)
        return child

    def first_dead(self) -> Child | None:
        """The first child that exited although nobody asked it to, if any."""
        for child in self.children:
            if not child.expected_exit and child.returncode() is not None:
                return child
        return None

    def stop_all(self, timeout: float) -> None:
        """SIGTERM each stage (highest first), wait up to ``timeout`` for it, then SIGKILL what is left."""
        for stage in sorted({c.stage for c in self.children}, reverse=True):
            group = [c for c in self.children if c.stage == stage]
            for child in group:
                child.expected_exit = True
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in group:
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.sink.line(child.name, f"did not stop in {timeout:.0f}s; killing it")
                    child.signal(signal.SIGKILL)
                    child.proc.wait()
                child.join_logs()

    def pids(self) -> list[int]:
        return [c.pid for c in self.children if c.pid is not None]


def child_env(base: dict[str, str] | None = None, **values: str) -> dict[str, str]:
    """A copy of ``base`` (default: this process's environment) with ``values`` set."""
    env = dict(os.environ if base is None else base)
    env.update(values)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
