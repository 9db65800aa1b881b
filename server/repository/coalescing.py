"""Calls made while an earlier one is out, sent together in one call when it is answered.

The workers of one process claim and complete jobs through these: one transaction for every job
that was ready at the same time, instead of one each (see *_credits_batched_claims.sql: the
database serialises the commits that announce a change, so the number of commits, not the
workers, limited the queue). A call made while none is out goes at once, alone: a quiet queue
waits for nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Sends items together: each item's result, or the exception that item is to raise, in order.
Send = Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]]


class Coalescer(Generic[T, R]):
    """One call out at a time; the items waiting meanwhile go together next, `max_batch` at
    most in one call."""

    def __init__(self, send: Send[T, R], max_batch: int) -> None:
        self._send = send
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def call(self, item: T) -> R:
        """`item`'s result, sent with the items waiting beside it. A caller cancelled before its
        item was sent takes it out; after, the item's result is dropped."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        entry = (item, future)
        self._waiting.append(entry)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all())
        try:
            return await future
        except asyncio.CancelledError:
            if entry in self._waiting:
                self._waiting.remove(entry)
            raise

    async def _send_all(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    outcomes = await self._send([item for item, _ in batch])
                except Exception as error:  # every item of the batch fails with it
                    outcomes = [error] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._sender = None
            # Cancelled itself (the loop closing): no caller is left waiting for ever.
            for _, future in batch + self._waiting:
                future.cancel()
