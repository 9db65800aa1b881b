"""The direct transport's connection pool: at most `max_size` asyncpg connections, reused
last-in first-out, and callers queued in order when all are busy.

asyncpg's own Pool spends a task (`asyncio.shield`) and a timeout context on every
acquire/release pair: a tenth of an RPC's time in this service, where each RPC is one query.
Here taking an idle connection and giving it back are plain method calls, and only a caller that
has to wait, or to open a connection, arms a timer (for the call's own time, see `acquire`). A
connection that is closed, or comes back from a call that did not end with the server's answer
(a cancellation, a timeout, a lost connection), is closed and its place opened afresh by the
next caller, so a database restart heals by itself.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable

import asyncpg

Connect = Callable[[], Awaitable[asyncpg.Connection]]


class PoolClosed(Exception):
    """The pool was closed: no more connections are handed out."""


def reusable_after(error: BaseException) -> bool:
    """Whether a connection may serve another call after its call raised `error`: only after an
    ordinary SQL error. A FATAL or PANIC one (a shutdown, a terminated backend) or a connection
    exception (class 08) ends the session, though the connection may not look closed yet; reused,
    it fails the next call with "another operation is in progress"."""
    return (
        isinstance(error, asyncpg.PostgresError)
        and error.severity not in ("FATAL", "PANIC")
        and not (error.sqlstate or "").startswith("08")
    )


class ConnectionPool:
    def __init__(self, connect: Connect, *, max_size: int, acquire_timeout: float) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._connect = connect
        self._max_size = max_size
        self._acquire_timeout = acquire_timeout
        self._idle: list[asyncpg.Connection] = []
        # Each waiter gets a connection, or None: a free place to open one in.
        self._waiters: collections.deque[asyncio.Future[asyncpg.Connection | None]] = (
            collections.deque()
        )
        # Places taken: connections open, being opened, or handed to a waiter to open.
        self._places = 0
        self._closed = False

    @classmethod
    async def open(
        cls, connect: Connect, *, min_size: int, max_size: int, acquire_timeout: float
    ) -> ConnectionPool:
        """A pool with `min_size` connections open already (so a bad URL fails here)."""
        pool = cls(connect, max_size=max_size, acquire_timeout=acquire_timeout)
        opened: list[asyncpg.Connection] = []
        try:
            for _ in range(min(min_size, max_size)):
                opened.append(await pool.acquire())
        except BaseException:
            for conn in opened:
                pool.release(conn, reusable=False)
            await pool.close()
            raise
        for conn in opened:
            pool.release(conn, reusable=True)
        return pool

    def size(self) -> int:
        """Connections open or being opened."""
        return self._places

    def idle(self) -> int:
        return len(self._idle)

    def busy(self) -> bool:
        """An acquire now would wait: no idle connection, and no place to open one."""
        return not self._idle and self._places >= self._max_size

    async def acquire(
        self, within: float | None = None, *, first: bool = False
    ) -> asyncpg.Connection:
        """An open connection for one call, within `within` seconds (default: the pool's
        acquire timeout) or TimeoutError; give it back with `release`. `first`: ahead of every
        caller waiting already."""
        if self._closed:
            raise PoolClosed()
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            self._places -= 1  # closed while idle (the server restarted, say)
        if within is None:
            within = self._acquire_timeout
        if self._places < self._max_size:
            self._places += 1
            return await self._open_in_place(within)
        started = time.monotonic()
        given = await self._wait(within, first)
        if given is not None:
            return given
        return await self._open_in_place(within - (time.monotonic() - started))

    def release(self, conn: asyncpg.Connection, *, reusable: bool) -> None:
        """Take `conn` back. `reusable` says the call ended with the server's answer (a result
        or an SQL error); any other ending closes the connection."""
        if not reusable or self._closed or conn.is_closed() or conn.is_in_transaction():
            conn.terminate()
            self._free_place()
            return
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(conn)
        else:
            self._idle.append(conn)

    async def close(self) -> None:
        """Close the idle connections and refuse new calls; busy ones close when released."""
        self._closed = True
        while self._waiters:
            self._waiters.popleft().cancel()
        idle, self._idle = self._idle, []
        self._places -= len(idle)
        for conn in idle:
            try:
                await conn.close(timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()

    async def _open_in_place(self, within: float) -> asyncpg.Connection:
        """A new connection in the place taken for it, opened within `within` seconds (a
        server that accepts the socket but never answers, frozen say, is given up on)."""
        try:
            async with asyncio.timeout(max(within, 0.0)):
                return await self._connect()
        except BaseException:
            self._free_place()
            raise

    async def _wait(self, within: float, first: bool) -> asyncpg.Connection | None:
        waiter: asyncio.Future[asyncpg.Connection | None] = (
            asyncio.get_running_loop().create_future()
        )
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            async with asyncio.timeout(within):
                return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Handed over just as the wait ended: pass it on.
                given = waiter.result()
                if given is None:
                    self._free_place()
                else:
                    self.release(given, reusable=True)
            elif self._closed:
                raise PoolClosed() from None
            raise

    def _free_place(self) -> None:
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(None)
        else:
            self._places -= 1

    def _next_waiter(self) -> asyncio.Future[asyncpg.Connection | None] | None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                return waiter
        return None
