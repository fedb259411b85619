"""Async life cycle shared by the services: signals, background tasks that fail loudly.

Every service process has one shape (``services/scheduler/__main__.py`` is the model):
``run`` (uvloop) -> signal handlers set a stop event -> the NATS connection and the
service entered into an ``AsyncExitStack`` -> ``wait_for_stop`` (a signal, or a
background task of the service's ``TaskGroup`` that failed) -> the stack unwinds in
reverse: the service drains and closes, then ``nc.drain()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop where it is installed (a faster event loop for every hop).

    Set ``FLOWKV_EVENT_LOOP=asyncio`` to use the standard loop.
    """
    if os.environ.get("FLOWKV_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGINT and SIGTERM set ``stop``; the service then drains and exits."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            pass


class TaskGroup:
    """Background tasks of a service. A task that dies unexpectedly is logged with its
    traceback; a critical one also sets ``failed``, which ends the service (``wait_for_stop``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._critical: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, critical: bool = True) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of the group.

        Args:
            coro: the task's body.
            name: the task's name in logs, after the group's.
            critical: whether the service cannot go on without it (a loop it runs for its
                whole life). False for the tasks of single requests: a failure is logged
                and the service keeps serving the others.
        """
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        if critical:
            self._critical.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        critical = task in self._critical
        self._critical.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)
            if critical:
                self.failed.set()

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Changes:
    """Wakes waiters when something they watch may have changed; each re-checks its own
    condition. Owners call ``notify()`` after a change (e.g. a request left); waiters
    ``await wait_until(condition, timeout)`` instead of polling with sleeps."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` holds; False if ``timeout`` seconds pass first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except asyncio.TimeoutError:
                return condition()
        return True


async def wait_for_stop(stop: asyncio.Event, tasks: TaskGroup) -> None:
    """Return when a signal asked to stop or a background task failed."""
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(tasks.failed.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
