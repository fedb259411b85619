"""The services' life-cycle helpers: supervised background tasks and waiting on changes."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.lifecycle import Changes, TaskGroup, wait_for_stop


async def _fail() -> None:
    raise RuntimeError("boom")


async def test_a_failed_critical_task_is_logged_and_stops_the_service(caplog):
    tasks = TaskGroup("svc")
    with caplog.at_level(logging.ERROR, logger="services.common.lifecycle"):
        tasks.spawn(_fail(), "loop")
        await wait_for_stop(asyncio.Event(), tasks)  # returns only because the task failed
    assert tasks.failed.is_set()
    assert [r.getMessage() for r in caplog.records] == ["background task svc:loop failed"]
    assert caplog.records[0].exc_info[1].args == ("boom",)


async def test_a_failed_request_task_is_logged_and_the_service_goes_on(caplog):
    tasks = TaskGroup("svc")
    with caplog.at_level(logging.ERROR, logger="services.common.lifecycle"):
        task = tasks.spawn(_fail(), "req-1", critical=False)
        with pytest.raises(RuntimeError):
            await task
        await asyncio.sleep(0)  # done-callbacks run on the next loop turn
    assert not tasks.failed.is_set()
    assert [r.getMessage() for r in caplog.records] == ["background task svc:req-1 failed"]


async def test_cancelled_tasks_are_not_failures():
    tasks = TaskGroup("svc")
    task = tasks.spawn(asyncio.Event().wait(), "loop")
    await asyncio.sleep(0)
    await tasks.cancel_all()
    assert task.cancelled() and not tasks.failed.is_set()


async def test_wait_until_wakes_on_notify_once_the_condition_holds():
    changes = Changes()
    inflight = {"a", "b"}
    waiter = asyncio.create_task(changes.wait_until(lambda: not inflight, timeout=3600))
    for rid in ("a", "b"):
        await _turns(10)
        assert not waiter.done()  # a request is still in flight
        inflight.discard(rid)
        changes.notify()
    await _turns(10)  # woken by the notify, long before the hour is up
    assert waiter.done() and waiter.result() is True


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_wait_until_answers_at_once_when_the_condition_holds_and_false_after_the_timeout():
    changes = Changes()
    assert await changes.wait_until(lambda: True, timeout=0) is True
    assert await changes.wait_until(lambda: False, timeout=0.01) is False
