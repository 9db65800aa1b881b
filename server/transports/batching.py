"""Concurrent calls of one SQL function, joined into one round trip while the pool is busy.

When every pooled connection is in use, a call of a function with a batched form
(`SqlCall.batched`) waits here rather than in the pool's queue. One waiter per function asks
the pool for a connection; the connection it gets takes up to MAX_BATCH of the calls waiting by
then and sends them as one call of the batched form: one round trip and one commit instead of
one each. A call that finds a connection free goes alone, so a quiet service pays nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from server.observability import metrics
from server.transports.pool import ConnectionPool, reusable_after

# At most this many calls in one batch, so that a long queue spreads over the connections as they
# free up (one backend runs a batch's calls one after another): at concurrency 32, batches of 8
# did as many debits a second as batches of 32, with a p99 a sixth lower. The SQL side refuses
# more than 32 (*_credits_batched_calls.sql).
MAX_BATCH = 8

Values = Sequence[object]
# Sends calls as one batch: each call's result or the exception it is to raise, in order.
Send = Callable[[asyncpg.Connection, Sequence[Values]], Awaitable[list[object]]]
# The exception each call of a batch raises when the whole batch failed with `error`.
Fail = Callable[[BaseException], BaseException]


class Batcher:
    """The waiting calls of one function (`name`, for the metrics), and the tasks sending them."""

    def __init__(self, name: str, pool: ConnectionPool, send: Send, fail: Fail) -> None:
        self._sizes = metrics.BATCHED_CALLS.labels(name)
        self._pool = pool
        self._send = send
        self._fail = fail
        self._waiting: list[tuple[Values, asyncio.Future[Any]]] = []
        self._asking = False  # a task is waiting for a connection for the calls waiting here
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, values: Values) -> Any:
        """The call's result, sent alone or with the calls waiting beside it."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((values, future))
        if not self._asking:
            self._start()
        return await future

    def _start(self) -> None:
        self._asking = True
        task = asyncio.get_running_loop().create_task(self._take_and_send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _take_and_send(self) -> None:
        try:
            conn = await self._pool.acquire()
        except BaseException as exc:
            self._asking = False
            waiting, self._waiting = self._waiting, []
            self._fail_all(waiting, exc)
            return
        self._asking = False
        # Calls whose callers gave up (a deadline, a cancelled RPC) are not sent.
        batch = [call for call in self._waiting[:MAX_BATCH] if not call[1].done()]
        del self._waiting[:MAX_BATCH]
        if self._waiting:
            self._start()
        if not batch:
            self._pool.release(conn, reusable=True)
            return
        self._sizes.observe(len(batch))
        # Back to the pool only after the server answered: results, or an SQL error.
        reusable = False
        try:
            outcomes = await self._send(conn, [values for values, _ in batch])
            reusable = True
        except BaseException as exc:
            reusable = reusable_after(exc)
            self._fail_all(batch, exc)
            return
        finally:
            self._pool.release(conn, reusable=reusable)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _fail_all(
        self, calls: list[tuple[Values, asyncio.Future[Any]]], exc: BaseException
    ) -> None:
        """Fail `calls` for `exc`; a cancellation or an exit is raised on after."""
        for _, future in calls:
            if not future.done():
                future.set_exception(self._fail(exc))
        if not isinstance(exc, Exception):
            raise exc
