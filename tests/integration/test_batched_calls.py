"""Calls joined into one round trip while the pool is busy (or MAX_OUT of a function's calls are
out), on a real PostgreSQL: each call gets its own answer, one call's refusal undoes nothing of
another's, batches never deadlock each other, a batch that fails as a whole writes nothing, and a
user whose row is locked holds up only their own calls.

The pool has one connection. A debit for a user whose profile row the test holds locked keeps that
connection busy; the calls made meanwhile wait together, and go as one batch (one transaction, so
their ledger rows share its start time, `now()`) when the lock is let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from server import errors
from server.repository import functions
from server.transports.batching import MAX_BATCH, MAX_OUT
from server.transports.postgres import PostgresTransport

Call = Callable[..., Awaitable[Any]]


@pytest_asyncio.fixture
async def transport(database_url: str) -> AsyncIterator[PostgresTransport]:
    opened = await PostgresTransport.connect(database_url, min_size=1, max_size=1)
    yield opened
    await opened.close()


@pytest_asyncio.fixture
async def owner(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def new_user(transport: PostgresTransport, credits: int) -> uuid.UUID:
    user_id = uuid.uuid4()
    service = transport.service()
    await service.call(functions.ProvisionProfile(user_id, ""))
    if credits:
        fund = f"fund-{user_id}"
        await service.call(
            functions.GrantCredits(user_id, credits, fund, "", {}, None, None, 50, "paid", [])
        )
    return user_id


def debit(transport: PostgresTransport, user_id: uuid.UUID, amount: int, key: str) -> Any:
    return transport.service().call(
        functions.Debit(user_id, amount, key, "batched", {"key": key}, "")
    )


def start_debits(
    transport: PostgresTransport, users: list[uuid.UUID], tag: str
) -> tuple[list[str], list[asyncio.Task[Any]]]:
    """A debit of 1 for each of `users`, started at once: their keys and their tasks."""
    keys = [f"{tag}-{n}-{user_id}" for n, user_id in enumerate(users)]
    calls = [
        asyncio.create_task(debit(transport, user_id, 1, key))
        for user_id, key in zip(users, keys, strict=True)
    ]
    return keys, calls


async def lock_profile(conn: asyncpg.Connection, user_id: uuid.UUID) -> None:
    """Hold `user_id`'s profile row locked until `conn`'s transaction ends."""
    await conn.execute(
        "select 1 from public.credit_profiles where user_id = $1 for update", user_id
    )


class Blocker:
    """Keeps the pool's only connection busy: a debit waiting on a profile row held locked."""

    def __init__(self, transport: PostgresTransport, owner: asyncpg.Connection) -> None:
        self._transport = transport
        self._owner = owner
        self._lock: asyncpg.transaction.Transaction | None = None
        self.call: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        user_id = await new_user(self._transport, 10)
        self._lock = self._owner.transaction()
        await self._lock.start()
        await lock_profile(self._owner, user_id)
        self.call = asyncio.create_task(debit(self._transport, user_id, 1, f"block-{user_id}"))
        await wait_for_lock_waiter(self._owner)

    async def release(self) -> None:
        assert self._lock is not None
        assert self.call is not None
        await self._lock.rollback()
        await self.call


async def wait_for_lock_waiter(owner: asyncpg.Connection) -> None:
    for _ in range(1000):  # up to 10 s, for a loaded machine
        if await owner.fetchval(
            "select count(*) from pg_stat_activity"
            " where application_name = 'credits' and wait_event_type = 'Lock'"
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the blocking call never waited for its lock")


@pytest_asyncio.fixture
async def blocker(transport: PostgresTransport, database_url: str) -> AsyncIterator[Blocker]:
    conn = await asyncpg.connect(database_url)
    yield Blocker(transport, conn)
    await conn.close()


async def settle() -> None:
    """Let the calls just made reach the batcher's queue."""
    for _ in range(5):
        await asyncio.sleep(0)


def batched_calls(declared: type[functions.SqlCall[Any]]) -> float:
    """Calls of `declared` sent in batches so far (this process's metric)."""
    labels = {"function": declared.function}
    return REGISTRY.get_sample_value("credits_db_batch_calls_sum", labels) or 0.0


async def ledger_rows(owner: asyncpg.Connection, keys: list[str]) -> list[asyncpg.Record]:
    return await owner.fetch(
        "select idempotency_key, amount, created_at from public.credit_transactions"
        " where idempotency_key = any($1::text[]) order by idempotency_key",
        keys,
    )


async def test_calls_made_while_the_pool_is_busy_go_as_one_transaction(
    transport: PostgresTransport, owner: asyncpg.Connection, blocker: Blocker
) -> None:
    users = [await new_user(transport, 100) for _ in range(5)]
    await blocker.start()
    keys = [f"one-tx-{user_id}" for user_id in users]
    calls = [
        asyncio.create_task(debit(transport, user_id, n + 1, key))
        for n, (user_id, key) in enumerate(zip(users, keys, strict=True))
    ]
    await settle()
    await blocker.release()
    results = await asyncio.gather(*calls)

    for n, (result, user_id, key) in enumerate(zip(results, users, keys, strict=True)):
        # Each caller gets its own call's answer.
        assert result["transaction"]["idempotency_key"] == key
        assert result["transaction"]["user_id"] == str(user_id)
        assert result["transaction"]["amount"] == n + 1
        assert result["balance"] == 100 - (n + 1)
        assert result["replayed"] is False
    rows = await ledger_rows(owner, keys)
    assert {row["idempotency_key"]: row["amount"] for row in rows} == {
        key: n + 1 for n, key in enumerate(keys)
    }
    assert len({row["created_at"] for row in rows}) == 1


async def test_a_queue_longer_than_a_batch_goes_in_several(
    transport: PostgresTransport, owner: asyncpg.Connection, blocker: Blocker
) -> None:
    user_id = await new_user(transport, 100)
    await blocker.start()
    keys = [f"long-queue-{n}-{user_id}" for n in range(MAX_BATCH + 3)]
    calls = [asyncio.create_task(debit(transport, user_id, 1, key)) for key in keys]
    await settle()
    await blocker.release()
    results = await asyncio.gather(*calls)

    assert sorted(result["balance"] for result in results) == list(range(100 - len(keys), 100))
    rows = await ledger_rows(owner, keys)
    # Rows of one batch share its transaction's start time.
    assert sorted(Counter(row["created_at"] for row in rows).values()) == [3, MAX_BATCH]


async def test_a_refused_call_undoes_nothing_of_the_others_in_its_batch(
    transport: PostgresTransport, owner: asyncpg.Connection, blocker: Blocker
) -> None:
    rich, poor = await new_user(transport, 50), await new_user(transport, 3)
    await blocker.start()
    calls = [
        asyncio.create_task(debit(transport, rich, 10, f"ok-1-{rich}")),
        asyncio.create_task(debit(transport, poor, 5, f"too-much-{poor}")),
        asyncio.create_task(debit(transport, rich, 0, f"zero-{rich}")),
        asyncio.create_task(debit(transport, rich, 15, f"ok-2-{rich}")),
    ]
    await settle()
    await blocker.release()
    first, too_much, zero, second = await asyncio.gather(*calls, return_exceptions=True)

    assert isinstance(too_much, errors.InsufficientCredits)
    assert (too_much.required, too_much.available) == (5, 3)
    assert isinstance(zero, errors.InvalidArgument)
    assert [v.field for v in zero.violations] == ["amount"]
    assert (first["balance"], second["balance"]) == (40, 25)
    profiles = await owner.fetch(
        "select user_id, balance from public.credit_profiles where user_id = any($1::uuid[])",
        [rich, poor],
    )
    assert {row["user_id"]: row["balance"] for row in profiles} == {rich: 25, poor: 3}
    written = await ledger_rows(owner, [f"ok-1-{rich}", f"ok-2-{rich}", f"too-much-{poor}"])
    assert [row["idempotency_key"] for row in written] == [f"ok-1-{rich}", f"ok-2-{rich}"]
    assert written[0]["created_at"] == written[1]["created_at"]  # one batch, one transaction


async def test_the_same_key_twice_in_one_batch_is_one_debit_and_a_replay(
    transport: PostgresTransport, owner: asyncpg.Connection, blocker: Blocker
) -> None:
    user_id = await new_user(transport, 20)
    await blocker.start()
    key = f"twice-{user_id}"
    calls = [asyncio.create_task(debit(transport, user_id, 4, key)) for _ in range(2)]
    await settle()
    await blocker.release()
    first, again = await asyncio.gather(*calls)

    assert (first["replayed"], again["replayed"]) == (False, True)
    assert first["transaction"]["transaction_id"] == again["transaction"]["transaction_id"]
    assert len(await ledger_rows(owner, [key])) == 1
    balance = await owner.fetchval(
        "select balance from public.credit_profiles where user_id = $1", user_id
    )
    assert balance == 16


async def test_each_debit_of_a_batch_spends_with_its_own_scope(
    transport: PostgresTransport, blocker: Blocker
) -> None:
    users = [await new_user(transport, 0) for _ in range(3)]
    for user_id in users:  # 5 credits for "model-a" only, 5 for anything
        await transport.service().call(
            functions.GrantCredits(
                user_id, 5, f"scoped-{user_id}", "", {}, None, None, 50, "paid", ["model-a"]
            )
        )
        await transport.service().call(
            functions.GrantCredits(user_id, 5, f"any-{user_id}", "", {}, None, None, 50, "paid", [])
        )
    await blocker.start()
    before = batched_calls(functions.Debit)
    scopes = ["model-a", "", "model-b"]
    calls = [
        asyncio.create_task(
            transport.service().call(functions.Debit(user_id, 8, f"scope-{user_id}", "", {}, scope))
        )
        for user_id, scope in zip(users, scopes, strict=True)
    ]
    await settle()
    await blocker.release()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    assert batched_calls(functions.Debit) - before == 3
    scoped, unscoped, other = outcomes
    assert isinstance(scoped, dict)
    assert [part["amount"] for part in scoped["transaction"]["allocations"]] == [5, 3]
    # Spending of another scope, or none, can use the unscoped grant only.
    for refused, scope in ((unscoped, ""), (other, "model-b")):
        assert isinstance(refused, errors.InsufficientCredits)
        assert (refused.required, refused.available, refused.scope) == (8, 5, scope)


async def test_profile_reads_join_and_a_missing_profile_fails_only_its_own_call(
    transport: PostgresTransport, blocker: Blocker
) -> None:
    known = [await new_user(transport, credits) for credits in (7, 9)]
    missing = uuid.uuid4()
    await blocker.start()
    before = batched_calls(functions.GetProfile)
    service = transport.service()
    calls = [
        asyncio.create_task(service.call(functions.GetProfile(user_id)))
        for user_id in (known[0], missing, known[1])
    ]
    await settle()
    await blocker.release()
    first, absent, second = await asyncio.gather(*calls, return_exceptions=True)

    assert batched_calls(functions.GetProfile) - before == 3
    assert isinstance(absent, errors.ProfileNotFound)
    assert (first["user_id"], first["balance"]) == (str(known[0]), 7)
    assert (second["user_id"], second["balance"]) == (str(known[1]), 9)


async def test_a_caller_that_gives_up_while_waiting_is_never_sent(
    transport: PostgresTransport, owner: asyncpg.Connection, blocker: Blocker
) -> None:
    user_id = await new_user(transport, 20)
    await blocker.start()
    before = batched_calls(functions.Debit)
    keys = [f"kept-{user_id}", f"gave-up-{user_id}"]
    kept, gave_up = (asyncio.create_task(debit(transport, user_id, 1, key)) for key in keys)
    await settle()
    gave_up.cancel()
    await blocker.release()
    assert (await kept)["balance"] == 19
    with pytest.raises(asyncio.CancelledError):
        await gave_up
    assert batched_calls(functions.Debit) - before == 1
    assert [row["idempotency_key"] for row in await ledger_rows(owner, keys)] == [keys[0]]


async def test_a_batch_whose_connection_is_lost_fails_every_call_and_writes_nothing(
    transport: PostgresTransport, owner: asyncpg.Connection, blocker: Blocker
) -> None:
    locked = await new_user(transport, 20)
    others = [await new_user(transport, 20) for _ in range(2)]
    await blocker.start()
    keys, calls = start_debits(transport, [*others, locked], "lost")
    await settle()
    # Hold one user's row too, so that the batch waits there, in the middle of its transaction.
    async with owner.transaction():
        await lock_profile(owner, locked)
        await blocker.release()
        await wait_for_lock_waiter(owner)
        await owner.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where application_name = 'credits' and wait_event_type = 'Lock'"
        )
        outcomes = await asyncio.gather(*calls, return_exceptions=True)

    assert all(isinstance(outcome, errors.BackendUnavailable) for outcome in outcomes), outcomes
    assert await ledger_rows(owner, keys) == []
    # The pool opens a new connection in the lost one's place.
    assert (await debit(transport, locked, 1, f"after-{locked}"))["balance"] == 19


async def test_a_deadlock_fails_at_most_the_call_it_hit_and_as_unavailable(
    transport: PostgresTransport, owner: asyncpg.Connection, blocker: Blocker
) -> None:
    """The batch locks `first`, then waits for `second`, held by another session that then
    waits for `first`: PostgreSQL ends the deadlock (after deadlock_timeout, 1 s) by failing one
    side's wait. When it is the batch's, its locks are undone and its calls go one by one, and
    may meet the same deadlock again. However it ends, the debit of `first` commits, and that of
    `second` either commits too or is BACKEND_UNAVAILABLE with nothing written, safe to retry
    with its key."""
    first, second = sorted([await new_user(transport, 10), await new_user(transport, 10)])
    await blocker.start()
    keys, calls = start_debits(transport, [first, second], "deadlock")
    await settle()
    with contextlib.suppress(asyncpg.DeadlockDetectedError):  # the other side's wait failed
        async with owner.transaction():
            await lock_profile(owner, second)
            await blocker.release()
            await wait_for_lock_waiter(owner)
            await lock_profile(owner, first)
    done, hit = await asyncio.gather(*calls, return_exceptions=True)

    assert done["balance"] == 9
    written = [row["idempotency_key"] for row in await ledger_rows(owner, keys)]
    if isinstance(hit, errors.BackendUnavailable):
        assert written == [keys[0]]
        assert (await debit(transport, second, 1, keys[1]))["replayed"] is False
    else:
        assert hit["balance"] == 9, hit
        assert sorted(written) == sorted(keys)


async def test_concurrent_batches_lock_profiles_in_one_order(
    transport: PostgresTransport, database_url: str
) -> None:
    """Two batches naming the same users in opposite orders: each locks them in user order, so
    the second waits for the first instead of deadlocking with it."""
    low, high = sorted([await new_user(transport, 10), await new_user(transport, 10)])
    first = await asyncpg.connect(database_url, server_settings={"role": "service_role"})
    second = await asyncpg.connect(database_url, server_settings={"role": "service_role"})
    statement = (
        "select error_code from public.credit_debit_each($1::uuid[], $2::bigint[], $3::text[],"
        " $4::text[], $5::jsonb[])"
    )

    def batch(conn: asyncpg.Connection, users: list[uuid.UUID], tag: str) -> Awaitable[Any]:
        keys = [f"{tag}-{user_id}" for user_id in users]
        return conn.fetch(
            statement, users, [1] * len(users), keys, [""] * len(users), ["{}"] * len(users)
        )

    try:
        async with first.transaction():
            # The first holds `low` only; the second, given (high, low), must wait for `low`
            # without taking `high`, or the first's next step would deadlock with it.
            assert [r["error_code"] for r in await batch(first, [low], "a")] == [None]
            waiting = asyncio.create_task(batch(second, [high, low], "b"))
            await asyncio.sleep(0.2)
            assert not waiting.done()
            assert [r["error_code"] for r in await batch(first, [high], "c")] == [None]
        assert [r["error_code"] for r in await waiting] == [None, None]
    finally:
        await first.close()
        await second.close()


async def test_a_batch_of_more_than_32_calls_is_refused(owner: asyncpg.Connection) -> None:
    users = [uuid.uuid4()] * 33
    async with owner.transaction():
        await owner.execute("set local role service_role")
        with pytest.raises(asyncpg.PostgresError) as refused:
            await owner.fetch("select * from public.credit_get_profile_each($1::uuid[])", users)
    assert refused.value.sqlstate == "CR008"


async def test_closing_fails_the_calls_still_waiting(
    transport: PostgresTransport, blocker: Blocker
) -> None:
    user_id = await new_user(transport, 5)
    await blocker.start()
    waiting = asyncio.create_task(debit(transport, user_id, 1, f"closing-{user_id}"))
    await settle()
    await transport.close()
    with pytest.raises(errors.BackendUnavailable):
        await waiting
    await blocker.release()


async def test_a_locked_row_holds_up_only_its_own_users_calls(
    database_url: str, owner: asyncpg.Connection
) -> None:
    """One user's profile row is held locked elsewhere while the pool (two connections) is
    busy: the debits of other users made beside theirs go through, in batches, while the lock
    is held; the user's own wait, and go once it is let go, each once and in order."""
    transport = await PostgresTransport.connect(
        database_url, min_size=1, max_size=2, timeout_seconds=30
    )
    try:
        hot = await new_user(transport, 100)
        others = [await new_user(transport, 100) for _ in range(6)]
        hot_keys = [f"hot-{n}-{hot}" for n in range(4)]
        before = batched_calls(functions.Debit)
        async with owner.transaction():
            await lock_profile(owner, hot)
            first = asyncio.create_task(debit(transport, hot, 1, hot_keys[0]))
            await wait_for_lock_waiter(owner)
            hot_calls = [
                first,
                *(asyncio.create_task(debit(transport, hot, 1, key)) for key in hot_keys[1:]),
            ]
            keys, calls = start_debits(transport, others, "beside-hot")
            done = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
            assert [result["transaction"]["idempotency_key"] for result in done] == keys
            assert not any(call.done() for call in hot_calls), "the row is still locked"
            assert batched_calls(functions.Debit) - before >= 2, "the pool was busy: batches"
        results = await asyncio.wait_for(asyncio.gather(*hot_calls), timeout=10)
    finally:
        await transport.close()

    assert [result["balance"] for result in results] == [99, 98, 97, 96]
    rows = await owner.fetch(
        "select idempotency_key from public.credit_transactions"
        " where user_id = $1 and kind = 'debit' order by seq",
        hot,
    )
    assert [row["idempotency_key"] for row in rows] == hot_keys


async def test_calls_beyond_max_out_wait_for_a_batch_though_connections_are_free(
    database_url: str, owner: asyncpg.Connection
) -> None:
    """MAX_OUT debits wait on rows held locked, with connections to spare: the debits made
    meanwhile are not sent alone but wait, and go together in one transaction when one of
    those is answered (group commit)."""
    transport = await PostgresTransport.connect(
        database_url, min_size=1, max_size=MAX_OUT + 5, timeout_seconds=30
    )
    watcher = await asyncpg.connect(database_url)  # outside the locking transaction
    try:
        locked = [await new_user(transport, 10) for _ in range(MAX_OUT)]
        others = [await new_user(transport, 10) for _ in range(5)]
        async with owner.transaction():
            for user_id in locked:
                await lock_profile(owner, user_id)
            _, held = start_debits(transport, locked, "held")
            for _ in range(1000):  # up to 10 s, for a loaded machine
                waiting = await watcher.fetchval(
                    "select count(*) from pg_stat_activity"
                    " where application_name = 'credits' and wait_event_type = 'Lock'"
                )
                if waiting == MAX_OUT:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"{waiting} of the {MAX_OUT} debits waited for their lock")
            keys, calls = start_debits(transport, others, "beyond-max-out")
            done, _ = await asyncio.wait(calls, timeout=0.5)
            assert not done, "sent alone though MAX_OUT calls were out"
        await asyncio.wait_for(asyncio.gather(*held, *calls), timeout=10)
    finally:
        await watcher.close()
        await transport.close()

    rows = await ledger_rows(owner, keys)
    assert len(rows) == len(others)
    assert len({row["created_at"] for row in rows}) == 1, "one batch, one transaction"
