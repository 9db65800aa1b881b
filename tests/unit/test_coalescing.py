"""server/repository/coalescing.py: calls made while one is out go together in the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from server.repository.coalescing import Coalescer


class Recorder:
    """A send that records its batches and answers each item doubled, once released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def send(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        await self.release.wait()
        return [ValueError(item) if item < 0 else item * 2 for item in items]


async def test_a_lone_call_goes_at_once_and_the_calls_made_meanwhile_go_together() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.send, max_batch=3)
    first = asyncio.create_task(coalescer.call(1))
    await asyncio.sleep(0)
    later = [asyncio.create_task(coalescer.call(n)) for n in (2, 3, 4, 5)]
    await asyncio.sleep(0)
    assert recorder.batches == [[1]]  # sent alone, before the others came
    recorder.release.set()
    assert await asyncio.gather(first, *later) == [2, 4, 6, 8, 10]
    assert recorder.batches == [[1], [2, 3, 4], [5]]  # at most max_batch in one


async def test_an_items_error_is_its_own_and_a_failed_send_fails_its_batch() -> None:
    recorder = Recorder()
    recorder.release.set()
    coalescer = Coalescer(recorder.send, max_batch=8)
    results = await asyncio.gather(
        coalescer.call(1), coalescer.call(-1), coalescer.call(3), return_exceptions=True
    )
    assert results[0::2] == [2, 6]
    assert isinstance(results[1], ValueError)

    async def broken(items: Sequence[int]) -> list[int | BaseException]:
        raise ConnectionError("down")

    failing = Coalescer(broken, max_batch=8)
    outcomes = await asyncio.gather(failing.call(1), failing.call(2), return_exceptions=True)
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)


async def test_a_caller_cancelled_before_its_item_is_sent_takes_it_out() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.send, max_batch=8)
    first = asyncio.create_task(coalescer.call(1))
    await asyncio.sleep(0)
    gone = asyncio.create_task(coalescer.call(2))
    kept = asyncio.create_task(coalescer.call(3))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    recorder.release.set()
    assert await asyncio.gather(first, kept) == [2, 6]
    assert recorder.batches == [[1], [3]]
