"""Concurrent calls of one SQL function, joined into one round trip under load.

When every pooled connection is in use, or MAX_OUT batches and lone calls of the function
(MAX_OUT_READS of one that only reads) are already at the database, a call of a function with
a batched form (`SqlCall.batched`) waits here rather than in the pool's queue. One waiter per
function asks the pool for a connection; the connection it gets takes up to MAX_BATCH of the
calls waiting by then and sends them as one call of the batched form: one round trip and one
commit instead of one each. A call that finds a connection free, and fewer than its maximum
out, goes alone, so a quiet service pays nothing.

Each call belongs to a user (the batched forms' first parameter, `p_user_id`: the profile row a call
locks), and a user is at the database in at most one batch or lone call at a time: the user's next
calls wait here until it has answered, then go together in a later batch, in their order. So no
batch ever waits for a row lock this process holds, and a user whose row is locked (a hot user, or a
transaction elsewhere) holds up that user's calls, and at most the one batch they are in, instead of
every connection: 48 callers on one user once halved the debits of everyone else, whose calls shared
batches queued behind that user's lock.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any

import asyncpg

from server.observability import metrics
from server.transports.pool import ConnectionPool, reusable_after

# At most this many calls in one batch, so that a long queue spreads over the connections as they
# free up (one backend runs a batch's calls one after another): at concurrency 32, batches of 8
# did as many debits a second as batches of 32, with a p99 a sixth lower. The SQL side refuses
# more than 32 (*_credits_batched_calls.sql).
MAX_BATCH = 8

# At most this many batches or lone calls of one function at the database at once, by default:
# a call that finds them all out waits for the next batch. That is what makes batches under
# load (group commit), and a batch of 8 debits costs the database 0.6 of 8 lone ones. A quiet
# service, with fewer calls out, sends each at once and alone. Two, not one: a batch waiting
# for a row locked elsewhere then holds up only half the lanes. Reads commit nothing and gain
# from going side by side: 3 of them. (Measured at 32 callers: bench/RESULTS.md.)
MAX_OUT = 2
MAX_OUT_READS = 3

Values = Sequence[object]
# Sends calls as one batch within a timeout: each call's result or the exception it is to raise,
# in order.
Send = Callable[[asyncpg.Connection, Sequence[Values], float], Awaitable[list[object]]]
# The exception each call of a batch raises when the whole batch failed with `error` (a
# TimeoutError: the call's own time ran out).
Fail = Callable[[BaseException], BaseException]


class _Waiting:
    """A call waiting for a batch: its user, its arguments, and its caller's future."""

    __slots__ = ("future", "user", "values")

    def __init__(self, user: Hashable, values: Values, future: asyncio.Future[Any]) -> None:
        self.user = user
        self.values = values
        self.future = future


class Batcher:
    """The waiting calls of one function (`name`, for the metrics), the users it has at the
    database, and the tasks sending batches, `max_out` of them at most. A batch is given
    `timeout` seconds to get a connection, and as long again to be answered."""

    def __init__(
        self,
        name: str,
        pool: ConnectionPool,
        send: Send,
        fail: Fail,
        timeout: float,
        max_out: int = MAX_OUT,
    ) -> None:
        self._sizes = metrics.BATCHED_CALLS.labels(name)
        self._pool = pool
        self._send = send
        self._fail = fail
        self._timeout = timeout
        self._max_out = max_out
        self._waiting: list[_Waiting] = []
        self._queued: collections.Counter[Hashable] = collections.Counter()  # waiting, per user
        self._at_database: set[Hashable] = set()  # users with a batch or a lone call out
        # Batches and lone calls out, and the one being sent (max_out at most).
        self._out = 0
        self._asking = False  # a task is waiting for a connection for the calls waiting here
        self._tasks: set[asyncio.Task[None]] = set()

    def may_go_alone(self, user: Hashable) -> bool:
        """Whether a call for `user` may go alone now: a connection is free, and the user has
        no call out or waiting (it would overtake it, or wait for its lock on a second
        connection)."""
        return (
            self._out < self._max_out
            and not self._pool.busy()
            and user not in self._at_database
            and not self._queued[user]
        )

    def going_alone(self, user: Hashable) -> None:
        """A call for `user` is sent alone (after `may_go_alone`); `done_alone` when answered."""
        self._out += 1
        self._at_database.add(user)

    def done_alone(self, user: Hashable) -> None:
        self._out -= 1
        self._finished((user,))

    async def call(self, user: Hashable, values: Values, within: float) -> Any:
        """The call's result, sent with the calls waiting beside it, within `within` seconds
        (then the caller's `fail(TimeoutError())`; a call not sent yet never is)."""
        entry = _Waiting(user, values, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        self._queued[user] += 1
        if user not in self._at_database:
            self._start()
        try:
            async with asyncio.timeout(within):
                return await entry.future
        except TimeoutError:
            self._forget(entry)
            raise self._fail(TimeoutError()) from None
        except asyncio.CancelledError:
            self._forget(entry)
            raise

    def _start(self) -> None:
        """Ask for a connection for the calls waiting, unless a task already is or max_out are
        out (the next to come back starts it)."""
        if self._asking or self._out >= self._max_out:
            return
        self._asking = True
        self._out += 1
        task = asyncio.get_running_loop().create_task(self._take_and_send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _sendable(self, entry: _Waiting) -> bool:
        return entry.user not in self._at_database and not entry.future.done()

    def _forget(self, entry: _Waiting) -> None:
        """Drop a call whose caller gave up, if it is still waiting."""
        for index, waiting in enumerate(self._waiting):
            if waiting is entry:
                del self._waiting[index]
                self._unqueue(entry.user)
                return

    def _unqueue(self, user: Hashable) -> None:
        self._queued[user] -= 1
        if not self._queued[user]:
            del self._queued[user]

    def _take(self) -> list[_Waiting]:
        """Up to MAX_BATCH waiting calls, in order, of users with nothing at the database; the
        calls of a user that has are kept waiting (and those of callers gone, dropped)."""
        batch: list[_Waiting] = []
        kept: list[_Waiting] = []
        for entry in self._waiting:
            if entry.future.done():
                self._unqueue(entry.user)
            elif len(batch) < MAX_BATCH and entry.user not in self._at_database:
                batch.append(entry)
                self._unqueue(entry.user)
            else:
                kept.append(entry)
        self._waiting = kept
        self._at_database.update(entry.user for entry in batch)
        return batch

    def _finished(self, users: Iterable[Hashable]) -> None:
        """`users`' calls out have been answered: their next calls may go, and so may those
        held back by max_out."""
        self._at_database.difference_update(users)
        if any(self._sendable(entry) for entry in self._waiting):
            self._start()

    async def _take_and_send(self) -> None:
        try:
            conn = await self._pool.acquire(self._timeout)
        except BaseException as exc:
            self._asking = False
            self._out -= 1
            waiting, self._waiting = self._waiting, []
            self._queued.clear()
            self._fail_all(waiting, exc)
            return
        self._asking = False
        batch = self._take()
        if any(self._sendable(entry) for entry in self._waiting):
            self._start()
        if not batch:
            self._out -= 1
            self._pool.release(conn, reusable=True)
            return
        self._sizes.observe(len(batch))
        # Back to the pool only after the server answered: results, or an SQL error.
        reusable = False
        try:
            outcomes = await self._send(conn, [entry.values for entry in batch], self._timeout)
            reusable = True
        except BaseException as exc:
            reusable = reusable_after(exc)
            self._fail_all(batch, exc)
            return
        finally:
            self._out -= 1
            self._pool.release(conn, reusable=reusable)
            self._finished({entry.user for entry in batch})
        for entry, outcome in zip(batch, outcomes, strict=True):
            if entry.future.done():
                continue
            if isinstance(outcome, BaseException):
                entry.future.set_exception(outcome)
            else:
                entry.future.set_result(outcome)

    def _fail_all(self, calls: list[_Waiting], exc: BaseException) -> None:
        """Fail `calls` for `exc`; a cancellation or an exit is raised on after."""
        for entry in calls:
            if not entry.future.done():
                entry.future.set_exception(self._fail(exc))
        if not isinstance(exc, Exception):
            raise exc
