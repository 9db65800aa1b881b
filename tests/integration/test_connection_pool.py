"""The direct transport's connection pool on a real PostgreSQL: reuse, the size bound, waiting
in order, timeouts, broken connections replaced, and closing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from server.transports.pool import ConnectionPool, PoolClosed, reusable_after


class Connector:
    """Opens connections to the test server, and remembers each to close it after the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[asyncpg.Connection] = []

    async def __call__(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.url)
        self.opened.append(conn)
        return conn


@pytest_asyncio.fixture
async def connect(postgres_admin_url: str) -> AsyncIterator[Connector]:
    connector = Connector(postgres_admin_url)
    yield connector
    for conn in connector.opened:
        conn.terminate()


async def terminate_backend(admin_url: str, pid: int, *, once_active: bool = False) -> None:
    """pg_terminate_backend(pid) from an admin session; with `once_active`, once it runs a query."""
    admin = await asyncpg.connect(admin_url)
    try:
        active = "select count(*) from pg_stat_activity where pid = $1 and state = 'active'"
        for _ in range(500 if once_active else 0):
            if await admin.fetchval(active, pid):
                break
            await asyncio.sleep(0.01)
        assert await admin.fetchval("select pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def backend_pid(conn: asyncpg.Connection) -> int:
    pid: int = await conn.fetchval("select pg_backend_pid()")
    return pid


async def test_opens_min_size_and_reuses_the_last_connection_returned(connect: Connector) -> None:
    pool = await ConnectionPool.open(connect, min_size=2, max_size=4, acquire_timeout=1)
    assert (pool.size(), pool.idle()) == (2, 2)
    first = await pool.acquire()
    pid = await backend_pid(first)
    pool.release(first, reusable=True)
    again = await pool.acquire()
    assert await backend_pid(again) == pid
    pool.release(again, reusable=True)
    assert (pool.size(), pool.idle()) == (2, 2)
    await pool.close()


async def test_never_opens_more_than_max_size_and_serves_waiters_in_order(
    connect: Connector,
) -> None:
    pool = await ConnectionPool.open(connect, min_size=0, max_size=2, acquire_timeout=5)
    assert not pool.busy()
    held = [await pool.acquire(), await pool.acquire()]
    assert pool.busy()
    order: list[int] = []

    async def wait(n: int) -> asyncpg.Connection:
        conn = await pool.acquire()
        order.append(n)
        return conn

    waiting = [asyncio.create_task(wait(n)) for n in range(2)]
    await asyncio.sleep(0.05)
    assert (pool.size(), order) == (2, [])
    for conn in held:
        pool.release(conn, reusable=True)
    served = await asyncio.gather(*waiting)
    assert order == [0, 1]
    assert {id(conn) for conn in served} == {id(conn) for conn in held}
    assert len(connect.opened) == 2
    for conn in served:
        pool.release(conn, reusable=True)
    await pool.close()


async def test_a_caller_asking_first_is_served_before_those_waiting_already(
    connect: Connector,
) -> None:
    """The generation queue's calls (`first=True`) go ahead of the API's waiting calls."""
    pool = await ConnectionPool.open(connect, min_size=0, max_size=1, acquire_timeout=5)
    held = await pool.acquire()
    order: list[str] = []

    async def wait(name: str, first: bool) -> None:
        conn = await pool.acquire(first=first)
        order.append(name)
        pool.release(conn, reusable=True)

    waiting = [asyncio.create_task(wait("api", first=False))]
    await asyncio.sleep(0.01)
    waiting.append(asyncio.create_task(wait("queue", first=True)))
    await asyncio.sleep(0.01)
    pool.release(held, reusable=True)
    await asyncio.gather(*waiting)
    assert order == ["queue", "api"]
    await pool.close()


async def test_a_caller_that_waits_too_long_times_out_and_leaks_nothing(
    connect: Connector,
) -> None:
    pool = await ConnectionPool.open(connect, min_size=0, max_size=1, acquire_timeout=0.1)
    held = await pool.acquire()
    with pytest.raises(TimeoutError):
        await pool.acquire()
    pool.release(held, reusable=True)
    conn = await pool.acquire()
    assert conn is held
    pool.release(conn, reusable=True)
    assert (pool.size(), pool.idle()) == (1, 1)
    await pool.close()


async def test_a_cancelled_waiter_leaves_the_connection_to_the_next(
    connect: Connector,
) -> None:
    pool = await ConnectionPool.open(connect, min_size=0, max_size=1, acquire_timeout=5)
    held = await pool.acquire()
    cancelled = asyncio.create_task(pool.acquire())
    later = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    cancelled.cancel()
    pool.release(held, reusable=True)
    assert await later is held
    assert cancelled.cancelled()
    pool.release(held, reusable=True)
    assert (pool.size(), pool.idle()) == (1, 1)
    await pool.close()


async def test_a_connection_not_reusable_is_closed_and_its_place_reopened(
    connect: Connector,
) -> None:
    pool = await ConnectionPool.open(connect, min_size=1, max_size=1, acquire_timeout=1)
    conn = await pool.acquire()
    pid = await backend_pid(conn)
    pool.release(conn, reusable=False)
    assert conn.is_closed()
    assert pool.size() == 0
    fresh = await pool.acquire()
    assert await backend_pid(fresh) != pid
    pool.release(fresh, reusable=True)
    await pool.close()


async def test_a_place_freed_by_a_broken_connection_goes_to_a_waiter(
    connect: Connector,
) -> None:
    pool = await ConnectionPool.open(connect, min_size=0, max_size=1, acquire_timeout=5)
    broken = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    pool.release(broken, reusable=False)
    fresh = await waiter
    assert fresh is not broken
    assert not fresh.is_closed()
    assert pool.size() == 1
    pool.release(fresh, reusable=True)
    await pool.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced(
    connect: Connector, postgres_admin_url: str
) -> None:
    pool = await ConnectionPool.open(connect, min_size=1, max_size=1, acquire_timeout=1)
    conn = await pool.acquire()
    pid = await backend_pid(conn)
    pool.release(conn, reusable=True)
    await terminate_backend(postgres_admin_url, pid)
    for _ in range(100):  # the loop notices the closed socket
        if conn.is_closed():
            break
        await asyncio.sleep(0.01)
    replaced = await pool.acquire()
    assert await backend_pid(replaced) != pid
    pool.release(replaced, reusable=True)
    assert pool.size() == 1
    await pool.close()


async def test_a_connection_is_reused_after_an_sql_error_only(connect: Connector) -> None:
    pool = await ConnectionPool.open(connect, min_size=1, max_size=1, acquire_timeout=5)
    conn = await pool.acquire()
    pid = await backend_pid(conn)
    with pytest.raises(asyncpg.PostgresError) as ordinary:
        await conn.fetchval("select 1 / 0")
    assert reusable_after(ordinary.value)
    pool.release(conn, reusable=reusable_after(ordinary.value))
    again = await pool.acquire()
    assert await backend_pid(again) == pid
    pool.release(again, reusable=True)
    await pool.close()
    # What a shutting-down or terminated backend sends ends the session.
    shutdown = {"C": "57P01", "M": "terminating connection due to administrator command"}
    assert not reusable_after(asyncpg.PostgresError.new({**shutdown, "S": "FATAL"}))
    assert not reusable_after(asyncpg.PostgresError.new({"C": "08006", "M": "lost", "S": "ERROR"}))
    assert not reusable_after(OSError("connection reset"))


async def test_a_connection_whose_backend_ends_mid_query_is_not_handed_out_again(
    connect: Connector, postgres_admin_url: str
) -> None:
    pool = await ConnectionPool.open(connect, min_size=1, max_size=1, acquire_timeout=5)
    conn = await pool.acquire()
    pid = await backend_pid(conn)
    running = asyncio.create_task(conn.fetchval("select pg_sleep(30)"))
    await terminate_backend(postgres_admin_url, pid, once_active=True)
    with pytest.raises(asyncpg.PostgresError) as ended:
        await running
    pool.release(conn, reusable=reusable_after(ended.value))
    replaced = await pool.acquire()
    assert await backend_pid(replaced) != pid
    assert await replaced.fetchval("select 1") == 1
    pool.release(replaced, reusable=True)
    await pool.close()


async def test_a_failed_connect_frees_its_place(postgres_admin_url: str) -> None:
    attempts = 0

    async def flaky() -> asyncpg.Connection:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("database not reachable yet")
        return await asyncpg.connect(postgres_admin_url)

    pool = ConnectionPool(flaky, max_size=1, acquire_timeout=1)
    with pytest.raises(OSError, match="not reachable yet"):
        await pool.acquire()
    assert pool.size() == 0
    conn = await pool.acquire()
    assert pool.size() == 1
    pool.release(conn, reusable=True)
    await pool.close()


async def test_close_closes_idle_connections_and_those_given_back_later(
    connect: Connector,
) -> None:
    pool = await ConnectionPool.open(connect, min_size=0, max_size=2, acquire_timeout=5)
    busy, idle = await pool.acquire(), await pool.acquire()
    pool.release(idle, reusable=True)
    await pool.close()
    assert idle.is_closed()
    assert not busy.is_closed()
    with pytest.raises(PoolClosed):
        await pool.acquire()
    pool.release(busy, reusable=True)
    assert busy.is_closed()
    assert pool.size() == 0


async def test_close_refuses_a_caller_still_waiting(connect: Connector) -> None:
    pool = await ConnectionPool.open(connect, min_size=0, max_size=1, acquire_timeout=5)
    busy = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    await pool.close()
    with pytest.raises(PoolClosed):
        await waiter
    pool.release(busy, reusable=True)
    assert pool.size() == 0


async def test_opening_closes_what_it_opened_when_a_connect_fails(connect: Connector) -> None:
    async def second_fails() -> asyncpg.Connection:
        if connect.opened:
            raise OSError("the second connection is refused")
        return await connect()

    with pytest.raises(OSError, match="second connection"):
        await ConnectionPool.open(second_fails, min_size=2, max_size=2, acquire_timeout=1)
    [first] = connect.opened
    assert first.is_closed()
