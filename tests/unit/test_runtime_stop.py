"""runtime.stop: background tasks are cancelled and awaited, and no one's cancellation is lost."""

from __future__ import annotations

import asyncio

import pytest

from server import runtime


async def test_a_stopped_task_has_ended_and_its_cancellation_stays_with_it() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    await runtime.stop(task)  # returns: the task's CancelledError is not the caller's
    assert task.cancelled()


async def test_the_callers_own_cancellation_reaches_it_while_it_waits() -> None:
    ended = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.2)  # cleanup that outlasts the caller's cancel
            ended.set()

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(runtime.stop(task))
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert not ended.is_set()  # the caller was let go before the task had ended
    await asyncio.wait_for(ended.wait(), 5)


async def test_every_task_ends_before_the_error_one_ended_with_is_raised() -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            raise RuntimeError("cleanup failed")

    first = asyncio.create_task(failing())
    second = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await runtime.stop(first, second)
    assert second.cancelled()


async def test_stopping_nothing_returns() -> None:
    await runtime.stop()
