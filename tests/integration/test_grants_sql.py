"""Credit grants in SQL (issue 17): burn-down, scopes, time, holds, refunds, voids, replays, the
invariant the database enforces, the conversion of existing balances, and races.

Every test calls the functions directly on a real PostgreSQL, as the owner (acting as the service
does) or as a user's session. This module has a database of its own, migrated like the
session's: its tests move `credits_private.clock` and commit, which must not move the time of
every other test's database. Every test works on fresh users; the clock is back at zero after
each test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from server.credit.sweeper import HoldSweeper
from server.db.migrate import discover, migrate
from server.repository import functions as fn
from server.repository.breaker import CredentialBreaker
from server.repository.credits import CreditRepository
from server.repository.layered import LayeredRepository
from server.transports.postgres import PostgresTransport, database_log
from tests.fixtures.database import create_database, drop_database, migrated_database
from tests.integration.test_sql_security import (
    SERVICE_CLAIMS,
    as_role,
    call,
    claims_for,
    expect_sqlstate,
    rolled_back,
)

INSUFFICIENT_CREDITS = "CR001"
KEY_REUSED = "CR002"
INVALID_ARGUMENT = "CR008"
GRANT_NOT_FOUND = "CR012"
GRANT_NOT_ACTIVE = "CR013"
CHECK_VIOLATION = "23514"
# The last migration before grants: the conversion is tested from there.
BEFORE_GRANTS = "20261204003000"
SIGNED = {"grant": 1, "refund": 1, "debit": -1, "capture": -1, "expire": -1, "void": -1}


@pytest.fixture(scope="module")
async def grants_db(postgres_admin_url: str) -> AsyncIterator[str]:
    """A database of this module's own, migrated: its tests move the clock."""
    async with migrated_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
async def owner(grants_db: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the schema's owner; the clock is set back to zero after the test."""
    conn = await asyncpg.connect(grants_db)
    try:
        yield conn
    finally:
        await conn.execute("""update credits_private.clock set "offset" = '0'""")
        await conn.close()


# Calls, as the owner (who may act for anyone, as the service does)

_keys = 0


def fresh_key() -> str:
    global _keys
    _keys += 1
    return f"key-{_keys}"


async def new_user(conn: asyncpg.Connection) -> uuid.UUID:
    user = uuid.uuid4()
    await conn.execute("select public.credit_provision_profile($1, 'u@example.com')", user)
    return user


async def give(
    conn: Any,
    user: uuid.UUID,
    amount: int,
    *,
    key: str | None = None,
    expire: datetime | None = None,
    effective: datetime | None = None,
    priority: int = 50,
    category: str = "paid",
    scopes: list[str] | None = None,
    description: str = "",
) -> Any:
    """credit_grant with every parameter; its result."""
    return await call(
        conn,
        "select public.credit_grant($1, $2, $3, $4, '{}'::jsonb, $5, $6, $7, $8, $9)",
        user,
        amount,
        key or fresh_key(),
        description,
        expire,
        effective,
        priority,
        category,
        scopes or [],
    )


async def grant_id(conn: Any, user: uuid.UUID, amount: int, **options: Any) -> uuid.UUID:
    granted = await give(conn, user, amount, **options)
    return uuid.UUID(granted["grant"]["grant_id"])


async def debit(
    conn: Any, user: uuid.UUID, amount: int, *, scope: str = "", key: str | None = None
) -> Any:
    return await call(
        conn,
        "select public.credit_debit($1, $2, $3, '', '{}'::jsonb, $4)",
        user,
        amount,
        key or fresh_key(),
        scope,
    )


async def reserve(
    conn: Any, user: uuid.UUID, amount: int, ttl: int, *, scope: str = "", key: str | None = None
) -> uuid.UUID:
    reserved = await call(
        conn,
        "select public.credit_reserve($1, $2, $3, $4, '', $5)",
        user,
        amount,
        key or fresh_key(),
        ttl,
        scope,
    )
    return uuid.UUID(reserved["hold"]["hold_id"])


async def capture(conn: Any, hold: uuid.UUID, amount: int, key: str | None = None) -> Any:
    return await call(
        conn, "select public.credit_capture($1, null, $2, $3)", hold, amount, key or fresh_key()
    )


async def refund(conn: Any, transaction: str, amount: int, key: str | None = None) -> Any:
    return await call(
        conn,
        "select public.credit_refund(null, $1, $2, $3)",
        uuid.UUID(transaction),
        amount,
        key or fresh_key(),
    )


async def void(conn: Any, grant: uuid.UUID, key: str | None = None, description: str = "") -> Any:
    return await call(
        conn,
        "select public.credit_void_grant($1, $2, $3)",
        grant,
        key or fresh_key(),
        description,
    )


async def profile(conn: Any, user: uuid.UUID) -> Any:
    return await call(conn, "select public.credit_get_profile($1)", user)


async def listed(conn: Any, user: uuid.UUID, states: list[str] | None = None) -> dict[str, Any]:
    """The user's grants as credit_list_grants shows them, by grant id."""
    rows = await call(conn, "select public.credit_list_grants($1, 100, null, $2)", user, states)
    return {row["grant_id"]: row for row in rows}


async def sweep(conn: Any) -> int:
    swept: int = await conn.fetchval("select public.credit_expire_holds(1000000)")
    return swept


async def now(conn: Any) -> datetime:
    value: datetime = await conn.fetchval("select credits_private.now()")
    return value


async def advance(conn: Any, by: timedelta) -> None:
    """Moves the clock of the credit functions on by `by` (committed)."""
    await conn.execute("""update credits_private.clock set "offset" = "offset" + $1""", by)


@dataclass(frozen=True)
class Entry:
    kind: str
    amount: int
    balance_after: int
    allocations: tuple[tuple[uuid.UUID, int], ...]
    key: str | None
    metadata: dict[str, str]


async def ledger(conn: Any, user: uuid.UUID) -> list[Entry]:
    rows = await conn.fetch(
        """
        select t.kind, t.amount, t.balance_after, t.idempotency_key, t.metadata,
               coalesce((select array_agg(array[a.grant_id::text, a.amount::text]
                                          order by a.ordinal)
                           from public.credit_allocations a
                          where a.transaction_id = t.transaction_id), '{}') as allocations
          from public.credit_transactions t
         where t.user_id = $1
         order by t.seq
        """,
        user,
    )
    return [
        Entry(
            r["kind"],
            r["amount"],
            r["balance_after"],
            tuple((uuid.UUID(g), int(a)) for g, a in r["allocations"]),
            r["idempotency_key"],
            json.loads(r["metadata"]),
        )
        for r in rows
    ]


def allocations(result: Any) -> list[tuple[uuid.UUID, int]]:
    """The allocations of a result's transaction."""
    return [(uuid.UUID(a["grant_id"]), a["amount"]) for a in result["transaction"]["allocations"]]


async def stored(conn: Any, grant: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(
        "select amount, remaining, pinned, activated, expired, voided_at is not null as voided"
        " from public.credit_grants where grant_id = $1",
        grant,
    )
    assert row is not None
    return row


async def assert_consistent(conn: Any, user: uuid.UUID) -> None:
    """The stored invariant, read back: balance = the ledger's sum = the remaining of the
    activated, unexpired grants; held = the pending holds = their pins; 0 <= remaining <= amount."""
    row = await conn.fetchrow(
        """
        select p.balance, p.held,
               (select coalesce(sum(case when t.kind in ('grant', 'refund') then t.amount
                                         else -t.amount end), 0)
                  from public.credit_transactions t where t.user_id = p.user_id) as ledger,
               (select coalesce(sum(g.remaining), 0) from public.credit_grants g
                 where g.user_id = p.user_id and g.activated and not g.expired) as grants,
               (select coalesce(sum(h.amount), 0) from public.credit_holds h
                 where h.user_id = p.user_id and h.state = 'pending') as holds,
               (select coalesce(sum(q.amount), 0) from public.credit_hold_pins q
                  join public.credit_holds h using (hold_id)
                 where h.user_id = p.user_id and h.state = 'pending') as pins,
               (select count(*) from public.credit_grants g
                 where g.user_id = p.user_id
                   and not (0 <= g.pinned and g.pinned <= g.remaining
                            and g.remaining <= g.amount)) as out_of_bounds
          from public.credit_profiles p where p.user_id = $1
        """,
        user,
    )
    assert row is not None
    assert row["balance"] == row["ledger"] == row["grants"], dict(row)
    assert row["held"] == row["holds"] == row["pins"], dict(row)
    assert row["balance"] >= row["held"] >= 0
    assert row["out_of_bounds"] == 0
    # And as the database checks it: a write of the profile row fires the check at commit.
    async with conn.transaction():
        await conn.execute(
            "update public.credit_profiles set balance = balance where user_id = $1", user
        )


async def refused(conn: Any, sqlstate: str, awaitable_call: str, *args: object) -> Any:
    """The error of a call that must fail with `sqlstate`, with its detail decoded."""
    error = await expect_sqlstate(conn, sqlstate, awaitable_call, *args)
    return json.loads(error.detail) if error.detail else None


# 1. Burn-down: priority; scoped before unscoped; soonest expiry, never last; oldest.


async def test_lowest_priority_number_is_spent_first(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    late = await grant_id(owner, user, 10, priority=60)
    first = await grant_id(owner, user, 10, priority=10)
    middle = await grant_id(owner, user, 10, priority=50)
    spent = await debit(owner, user, 25)
    assert allocations(spent) == [(first, 10), (middle, 10), (late, 5)]
    assert spent["balance"] == 5
    await assert_consistent(owner, user)


async def test_grants_scoped_to_the_spending_go_before_unscoped_ones(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    anything = await grant_id(owner, user, 10)
    for_video = await grant_id(owner, user, 10, scopes=["video", "audio"])
    # Priority decides before scope: a scoped grant of a higher number waits.
    later_video = await grant_id(owner, user, 10, scopes=["video"], priority=70)
    spent = await debit(owner, user, 15, scope="video")
    assert allocations(spent) == [(for_video, 10), (anything, 5)]
    spent = await debit(owner, user, 8, scope="video")
    assert allocations(spent) == [(anything, 5), (later_video, 3)]
    await assert_consistent(owner, user)


async def test_soonest_expiry_first_and_never_expiring_last(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    start = await now(owner)
    never = await grant_id(owner, user, 10)
    in_two_days = await grant_id(owner, user, 10, expire=start + timedelta(days=2))
    tomorrow = await grant_id(owner, user, 10, expire=start + timedelta(days=1))
    spent = await debit(owner, user, 25)
    assert allocations(spent) == [(tomorrow, 10), (in_two_days, 10), (never, 5)]
    await assert_consistent(owner, user)


async def test_oldest_first_then_by_sequence(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    older = await grant_id(owner, user, 10)
    await advance(owner, timedelta(seconds=1))
    newer = await grant_id(owner, user, 10)
    spent = await debit(owner, user, 15)
    assert allocations(spent) == [(older, 10), (newer, 5)]
    # Made at the same instant (one transaction): the first made goes first.
    twins = await new_user(owner)
    async with owner.transaction():
        one = await grant_id(owner, twins, 5)
        two = await grant_id(owner, twins, 5)
    assert allocations(await debit(owner, twins, 7)) == [(one, 5), (two, 2)]


# 2. Scopes: a scoped grant pays only for spending of one of its scopes.


async def test_a_scoped_grant_never_pays_unscoped_or_other_spending(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    await give(owner, user, 50, scopes=["image"])
    query = "select public.credit_debit($1, 1, $2, '', '{}'::jsonb, $3)"
    detail = await refused(owner, INSUFFICIENT_CREDITS, query, user, fresh_key(), "")
    assert detail == {"required": 1, "available": 0, "scope": ""}
    detail = await refused(owner, INSUFFICIENT_CREDITS, query, user, fresh_key(), "video")
    assert detail == {"required": 1, "available": 0, "scope": "video"}
    spent = await debit(owner, user, 50, scope="image")
    assert spent["balance"] == 0
    checked = await call(owner, "select public.credit_check($1, 60, 'image')", user)
    assert checked == {"sufficient": False, "available": 0, "shortfall": 60}
    await assert_consistent(owner, user)


async def test_check_counts_what_a_debit_of_that_scope_may_use(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    await give(owner, user, 30)
    await give(owner, user, 20, scopes=["video"])
    check = "select public.credit_check($1, $2, $3)"
    assert await call(owner, check, user, 40, "") == {
        "sufficient": False,
        "available": 30,
        "shortfall": 10,
    }
    assert await call(owner, check, user, 40, "video") == {
        "sufficient": True,
        "available": 50,
        "shortfall": 0,
    }
    # The profile counts every active grant.
    assert (await profile(owner, user))["available"] == 50
    await refused(owner, INVALID_ARGUMENT, check, user, 0, "")
    await refused(owner, INVALID_ARGUMENT, check, user, 1, "x" * 101)


@pytest.mark.parametrize(
    ("field", "arguments"),
    [
        ("priority", {"priority": 101}),
        ("priority", {"priority": -1}),
        ("category", {"category": "free"}),
        ("scopes", {"scopes": [""]}),
        ("scopes", {"scopes": ["x" * 101]}),
        ("scopes", {"scopes": [f"s{i}" for i in range(21)]}),
        ("expire_time", {"expire": "past"}),
        ("expire_time", {"expire": "before effective"}),
    ],
)
async def test_invalid_grants_name_the_field(
    owner: asyncpg.Connection, field: str, arguments: dict[str, Any]
) -> None:
    user = await new_user(owner)
    start = await now(owner)
    if arguments.get("expire") == "past":
        arguments = {"expire": start - timedelta(seconds=1)}
    elif arguments.get("expire") == "before effective":
        arguments = {
            "expire": start + timedelta(hours=1),
            "effective": start + timedelta(hours=2),
        }
    with pytest.raises(asyncpg.PostgresError) as caught:
        await give(owner, user, 10, **arguments)
    assert caught.value.sqlstate == INVALID_ARGUMENT
    assert json.loads(caught.value.detail or "{}")["field"] == field
    assert await ledger(owner, user) == []


async def test_scopes_are_stored_sorted_and_distinct(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    granted = await give(owner, user, 10, scopes=["b", "a", "b"])
    assert granted["grant"]["scopes"] == ["a", "b"]
    # The same request, scopes in another order, is a replay of it.
    again = await give(
        owner, user, 10, key=granted["transaction"]["idempotency_key"], scopes=["a", "b"]
    )
    assert again["replayed"] is True


# 3. Grants that take effect later count nowhere until then.


async def test_a_future_grant_counts_from_its_effective_time(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    await give(owner, user, 10)
    start = await now(owner)
    pending = await give(owner, user, 40, effective=start + timedelta(hours=1), key="later")
    assert pending["transaction"] is None
    assert (pending["grant"]["state"], pending["balance"]) == ("pending", 10)
    later = uuid.UUID(pending["grant"]["grant_id"])
    assert (await profile(owner, user))["balance"] == 10
    await refused(
        owner,
        INSUFFICIENT_CREDITS,
        "select public.credit_debit($1, 11, 'too-early', '', '{}'::jsonb)",
        user,
    )
    # A replay while it is pending: the same grant, no transaction yet.
    replay = await give(owner, user, 40, effective=start + timedelta(hours=1), key="later")
    assert (replay["replayed"], replay["transaction"]) == (True, None)
    assert replay["grant"]["grant_id"] == str(later)

    await advance(owner, timedelta(hours=2))
    # Reads count it at once; the GRANT entry waits for the next money call.
    seen = await profile(owner, user)
    assert (seen["balance"], seen["available"]) == (50, 50)
    assert (await listed(owner, user))[str(later)]["state"] == "active"
    assert [e.kind for e in await ledger(owner, user)] == ["grant"]
    spent = await debit(owner, user, 45)
    entries = await ledger(owner, user)
    assert [(e.kind, e.amount, e.balance_after, e.key) for e in entries] == [
        ("grant", 10, 10, entries[0].key),
        ("grant", 40, 50, "later"),
        ("debit", 45, 5, entries[2].key),
    ]
    assert entries[1].allocations == ((later, 40),)
    assert spent["balance"] == 5
    # Its replay now carries the entry written for it.
    replay = await give(owner, user, 40, effective=start + timedelta(hours=1), key="later")
    assert replay["replayed"] is True
    assert replay["transaction"]["idempotency_key"] == "later"
    assert replay["transaction"]["balance_after"] == 50
    await assert_consistent(owner, user)


async def test_the_sweeper_writes_the_grant_entry_of_an_idle_user(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    start = await now(owner)
    await give(owner, user, 25, effective=start + timedelta(minutes=5))
    await advance(owner, timedelta(minutes=6))
    assert await sweep(owner) >= 1
    entries = await ledger(owner, user)
    assert [(e.kind, e.amount, e.balance_after) for e in entries] == [("grant", 25, 25)]
    assert await sweep(owner) == 0  # nothing due any more
    await assert_consistent(owner, user)


async def out_of_step(conn: asyncpg.Connection, user: uuid.UUID, by: int) -> None:
    """Moves the user's balance by `by` behind the checks' back (triggers off, as a restore
    would run), putting it out of step with its grants."""
    async with conn.transaction():
        await conn.execute("set local session_replication_role = replica")
        await conn.execute(
            "update public.credit_profiles set balance = balance + $2 where user_id = $1",
            user,
            by,
        )


async def stuck_user(owner: asyncpg.Connection) -> uuid.UUID:
    """A new user whose grant of 25 expires in 4 minutes and whose books are out of step by 1,
    so that settling it fails; `out_of_step(owner, user, -1)` sets it right."""
    user = await new_user(owner)
    await give(owner, user, 25, expire=await now(owner) + timedelta(minutes=4))
    await out_of_step(owner, user, 1)
    return user


async def test_the_sweeper_skips_a_user_whose_settlement_fails_and_settles_the_rest(
    owner: asyncpg.Connection,
) -> None:
    broken, healthy = await stuck_user(owner), await new_user(owner)
    # `broken` is due first, so the sweep meets it before `healthy`.
    await give(owner, healthy, 25, expire=await now(owner) + timedelta(minutes=5))
    warnings: list[str] = []
    owner.add_log_listener(lambda _conn, message: warnings.append(str(message)))
    try:
        await advance(owner, timedelta(minutes=6))
        # Its books are checked at commit: the sweep now checks each user's before the next.
        assert await sweep(owner) >= 1
        assert [(e.kind, e.amount) for e in await ledger(owner, healthy)] == [
            ("grant", 25),
            ("expire", 25),
        ]
        await assert_consistent(owner, healthy)
        assert [(e.kind, e.amount) for e in await ledger(owner, broken)] == [("grant", 25)]
        still_due = "select next_settle_at <= credits_private.now() from public.credit_profiles"
        assert await owner.fetchval(f"{still_due} where user_id = $1", broken) is True
        assert [w for w in warnings if str(broken) in w and "out of step" in w]
    finally:
        await out_of_step(owner, broken, -1)
    assert await sweep(owner) == 1  # set right, it is settled like anyone else
    assert [(e.kind, e.amount) for e in await ledger(owner, broken)][-1] == ("expire", 25)
    await assert_consistent(owner, broken)


async def test_a_sweep_goes_on_past_users_it_cannot_settle(owner: asyncpg.Connection) -> None:
    """A call settles up to its number of users, trying past the ones that fail: users that
    keep failing never hold up those due after them."""
    broken, healthy = await stuck_user(owner), await new_user(owner)
    await give(owner, healthy, 25, expire=await now(owner) + timedelta(minutes=5))
    try:
        await advance(owner, timedelta(minutes=6))
        assert await owner.fetchval("select public.credit_expire_holds(0)") == 0
        assert await owner.fetchval("select public.credit_expire_holds(1)") == 1
        assert [(e.kind, e.amount) for e in await ledger(owner, healthy)][-1] == ("expire", 25)
        assert [(e.kind, e.amount) for e in await ledger(owner, broken)] == [("grant", 25)]
        with pytest.raises(asyncpg.PostgresError) as negative:
            await owner.fetchval("select public.credit_expire_holds(-1)")
        assert negative.value.sqlstate == "2201W"
    finally:
        await out_of_step(owner, broken, -1)
    assert await owner.fetchval("select public.credit_expire_holds(null)") >= 1  # everyone due
    assert [(e.kind, e.amount) for e in await ledger(owner, broken)][-1] == ("expire", 25)


async def test_the_sweeper_reports_how_long_a_user_it_cannot_settle_has_been_due(
    owner: asyncpg.Connection, grants_db: str
) -> None:
    broken = await stuck_user(owner)
    transport = await PostgresTransport.connect(grants_db, min_size=1, max_size=1)
    sweeper = HoldSweeper(CreditRepository(LayeredRepository(transport, CredentialBreaker())))
    lag = "credits_settlement_lag_seconds"
    try:
        try:
            await advance(owner, timedelta(minutes=6))
            await sweeper.sweep()
            # Due at +4 minutes, skipped at +6: two minutes and the test's own seconds.
            assert 120 <= (REGISTRY.get_sample_value(lag) or 0) < 180
        finally:
            await out_of_step(owner, broken, -1)
        await sweeper.sweep()  # set right, it is settled, and nobody is due any more
        assert REGISTRY.get_sample_value(lag) == 0
    finally:
        await transport.close()


async def test_the_service_logs_the_user_its_sweep_skipped(
    owner: asyncpg.Connection, grants_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    broken = await stuck_user(owner)
    transport = await PostgresTransport.connect(grants_db, min_size=1, max_size=1)
    warned = REGISTRY.get_sample_value("credits_database_warnings_total") or 0.0
    try:
        await advance(owner, timedelta(minutes=6))
        with caplog.at_level(logging.WARNING, logger=database_log.name):
            await transport.service().call(fn.ExpireHolds(1000000))
            await asyncio.sleep(0)  # asyncpg hands the warning over on the loop's next turn
    finally:
        await transport.close()
        await out_of_step(owner, broken, -1)
    [warning] = [r for r in caplog.records if r.name == database_log.name]
    assert warning.levelno == logging.WARNING
    assert str(broken) in warning.getMessage()
    assert "out of step" in warning.getMessage()
    assert REGISTRY.get_sample_value("credits_database_warnings_total") == warned + 1


async def test_a_grant_effective_and_expired_while_idle_gets_both_entries(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    start = await now(owner)
    brief = await grant_id(
        owner,
        user,
        30,
        effective=start + timedelta(hours=1),
        expire=start + timedelta(hours=2),
    )
    await give(owner, user, 5)
    await advance(owner, timedelta(hours=3))
    assert (await profile(owner, user))["balance"] == 5
    await debit(owner, user, 1)
    entries = await ledger(owner, user)
    assert [(e.kind, e.amount, e.balance_after) for e in entries] == [
        ("grant", 5, 5),
        ("grant", 30, 35),
        ("expire", 30, 5),
        ("debit", 1, 4),
    ]
    assert entries[2].allocations == ((brief, 30),)
    assert (await listed(owner, user))[str(brief)]["state"] == "expired"
    await assert_consistent(owner, user)


# 4. Expiry: reads count it at once, the EXPIRE entry is written under the lock.


async def test_expired_credits_stop_counting_at_once_and_leave_in_an_expire_entry(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    start = await now(owner)
    soon = await grant_id(owner, user, 30, expire=start + timedelta(hours=1))
    await give(owner, user, 20)
    await debit(owner, user, 10)  # from the expiring grant
    seen = await profile(owner, user)
    assert datetime.fromisoformat(seen["next_expire_time"]) == start + timedelta(hours=1)
    assert seen["next_expire_amount"] == 20

    await advance(owner, timedelta(hours=1))  # exactly at its expiry: gone
    seen = await profile(owner, user)
    assert (seen["balance"], seen["available"], seen["next_expire_time"]) == (20, 20, None)
    assert (await listed(owner, user))[str(soon)]["state"] == "expired"
    assert (await listed(owner, user))[str(soon)]["remaining"] == 0
    # Nothing written by reading it.
    assert [e.kind for e in await ledger(owner, user)] == ["grant", "grant", "debit"]
    assert (await stored(owner, soon))["remaining"] == 20

    detail = await refused(
        owner,
        INSUFFICIENT_CREDITS,
        "select public.credit_debit($1, 21, 'over', '', '{}'::jsonb)",
        user,
    )
    assert detail == {"required": 21, "available": 20, "scope": ""}
    await debit(owner, user, 20)
    entries = await ledger(owner, user)
    assert [(e.kind, e.amount, e.balance_after) for e in entries[3:]] == [
        ("expire", 20, 20),
        ("debit", 20, 0),
    ]
    assert entries[3].allocations == ((soon, 20),)
    assert entries[3].metadata == {"grant_id": str(soon)}
    row = await stored(owner, soon)
    assert (row["remaining"], row["expired"]) == (0, True)
    await assert_consistent(owner, user)


async def test_the_sweeper_expires_an_idle_users_grant(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    start = await now(owner)
    soon = await grant_id(owner, user, 30, expire=start + timedelta(minutes=1))
    await advance(owner, timedelta(minutes=2))
    assert await sweep(owner) >= 1
    entries = await ledger(owner, user)
    assert [(e.kind, e.amount, e.balance_after) for e in entries] == [
        ("grant", 30, 30),
        ("expire", 30, 0),
    ]
    assert entries[1].allocations == ((soon, 30),)
    await assert_consistent(owner, user)


async def test_next_expiry_is_the_soonest_and_sums_the_grants_expiring_then(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    start = await now(owner)
    first, second = start + timedelta(days=1), start + timedelta(days=2)
    await give(owner, user, 10, expire=first)
    await give(owner, user, 15, expire=first)
    await give(owner, user, 7, expire=second)
    await give(owner, user, 100)
    seen = await profile(owner, user)
    assert datetime.fromisoformat(seen["next_expire_time"]) == first
    assert seen["next_expire_amount"] == 25
    await advance(owner, timedelta(days=1, seconds=1))
    seen = await profile(owner, user)
    assert datetime.fromisoformat(seen["next_expire_time"]) == second
    assert (seen["next_expire_amount"], seen["balance"]) == (7, 107)


# 5. Holds pin credits: a reservation skips grants that expire before it; pins never expire.


async def test_a_reservation_skips_grants_that_expire_before_the_hold(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    start = await now(owner)
    short = await grant_id(owner, user, 50, expire=start + timedelta(minutes=10), priority=10)
    lasting = await grant_id(owner, user, 20)
    long_hold = await reserve(owner, user, 15, ttl=3600)
    pins = await owner.fetch(
        "select grant_id, amount from public.credit_hold_pins where hold_id = $1", long_hold
    )
    assert [tuple(p) for p in pins] == [(lasting, 15)]
    detail = await refused(
        owner,
        INSUFFICIENT_CREDITS,
        "select public.credit_reserve($1, 6, 'too-long', 3600, '')",
        user,
    )
    assert detail == {"required": 6, "available": 5, "scope": ""}
    # A hold that ends before the grant expires may use it (it goes first: priority 10).
    short_hold = await reserve(owner, user, 30, ttl=300)
    pins = await owner.fetch(
        "select grant_id, amount from public.credit_hold_pins where hold_id = $1", short_hold
    )
    assert [tuple(p) for p in pins] == [(short, 30)]
    assert (await stored(owner, short))["pinned"] == 30
    await assert_consistent(owner, user)


async def test_a_pinned_credit_is_never_expired(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    start = await now(owner)
    soon = await grant_id(owner, user, 50, expire=start + timedelta(minutes=10))
    hold = await reserve(owner, user, 40, ttl=540)
    await advance(owner, timedelta(minutes=8, seconds=59))
    # Up to its hold's end, what it pins is there to capture.
    captured = await capture(owner, hold, 30)
    assert allocations(captured) == [(soon, 30)]
    await advance(owner, timedelta(minutes=2))
    assert await sweep(owner) >= 1
    entries = await ledger(owner, user)
    assert [(e.kind, e.amount, e.balance_after) for e in entries] == [
        ("grant", 50, 50),
        ("capture", 30, 20),
        ("expire", 20, 0),
    ]
    await assert_consistent(owner, user)


async def test_an_expired_hold_frees_its_pins_before_the_grant_expires(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    async with owner.transaction():  # one now(): the hold ends exactly when the grant does
        start = await now(owner)
        soon = await grant_id(owner, user, 50, expire=start + timedelta(minutes=10))
        hold = await reserve(owner, user, 40, ttl=600)
    await advance(owner, timedelta(minutes=10))
    # Both fall due at the same instant: the hold goes first, so nothing pinned expires.
    seen = await profile(owner, user)
    assert (seen["balance"], seen["held"]) == (0, 0)
    assert await sweep(owner) >= 1
    assert (
        await owner.fetchval("select state from public.credit_holds where hold_id = $1", hold)
        == "expired"
    )
    entries = await ledger(owner, user)
    assert [(e.kind, e.amount) for e in entries] == [("grant", 50), ("expire", 50)]
    row = await stored(owner, soon)
    assert (row["remaining"], row["pinned"], row["expired"]) == (0, 0, True)
    await assert_consistent(owner, user)


async def test_a_holds_create_and_expire_times_follow_the_clock(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    await give(owner, user, 10)
    await advance(owner, timedelta(days=2))
    reserved = await call(owner, "select public.credit_reserve($1, 5, 'timed', 600, '')", user)
    created = datetime.fromisoformat(reserved["hold"]["create_time"])
    expires = datetime.fromisoformat(reserved["hold"]["expire_time"])
    assert expires - created == timedelta(seconds=600)
    assert abs(created - await now(owner)) < timedelta(seconds=5)  # two days ahead, as the clock


async def test_partial_capture_consumes_pins_in_order_and_frees_the_rest(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    first = await grant_id(owner, user, 20, priority=10)
    second = await grant_id(owner, user, 50)
    hold = await reserve(owner, user, 30, ttl=600)
    assert ((await stored(owner, first))["pinned"], (await stored(owner, second))["pinned"]) == (
        20,
        10,
    )
    assert (await debit(owner, user, 40))["balance"] == 30  # 40 free of second
    captured = await capture(owner, hold, 25)
    assert allocations(captured) == [(first, 20), (second, 5)]
    assert captured["balance"] == 5
    row = await stored(owner, second)
    assert (row["remaining"], row["pinned"]) == (5, 0)
    assert (await profile(owner, user))["available"] == 5
    await assert_consistent(owner, user)


# 6. Refunds go back where they came from; never into credits that no longer count.


async def test_a_refund_returns_credits_to_their_grants_last_drawn_first(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    first = await grant_id(owner, user, 20, priority=10)
    second = await grant_id(owner, user, 20)
    spent = await debit(owner, user, 30)
    assert allocations(spent) == [(first, 20), (second, 10)]
    back = await refund(owner, spent["transaction"]["transaction_id"], 15)
    assert allocations(back) == [(second, 10), (first, 5)]
    assert back["balance"] == 25
    back = await refund(owner, spent["transaction"]["transaction_id"], 0)
    assert allocations(back) == [(first, 15)]
    assert (
        (await stored(owner, first))["remaining"],
        (await stored(owner, second))["remaining"],
    ) == (
        20,
        20,
    )
    await assert_consistent(owner, user)


async def test_a_refund_into_an_expired_grant_expires_again_at_once(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    start = await now(owner)
    soon = await grant_id(owner, user, 20, expire=start + timedelta(hours=1))
    lasting = await grant_id(owner, user, 20)
    spent = await debit(owner, user, 30)
    assert allocations(spent) == [(soon, 20), (lasting, 10)]
    await advance(owner, timedelta(hours=2))
    key = fresh_key()
    back = await refund(owner, spent["transaction"]["transaction_id"], 25, key)
    assert allocations(back) == [(lasting, 10), (soon, 15)]
    entries = await ledger(owner, user)
    assert [(e.kind, e.amount, e.balance_after) for e in entries[-2:]] == [
        ("refund", 25, 35),
        ("expire", 15, 20),
    ]
    assert entries[-1].allocations == ((soon, 15),)
    assert entries[-1].metadata == {"refund_transaction_id": back["transaction"]["transaction_id"]}
    # The balance of the result is after both entries, and so is its replay's.
    assert back["balance"] == 20
    replay = await refund(owner, spent["transaction"]["transaction_id"], 25, key)
    assert (replay["replayed"], replay["balance"]) == (True, 20)
    assert replay["transaction"] == back["transaction"]
    # (Spent to nothing before it expired, it had no remainder to expire: it is expired by time.)
    assert (await stored(owner, soon))["remaining"] == 0
    assert (await listed(owner, user))[str(soon)]["state"] == "expired"
    await assert_consistent(owner, user)


async def test_a_refund_into_a_voided_grant_is_voided_again_at_once(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    gone = await grant_id(owner, user, 20, priority=10)
    await give(owner, user, 20)
    spent = await debit(owner, user, 10)
    await void(owner, gone)
    back = await refund(owner, spent["transaction"]["transaction_id"], 0)
    entries = await ledger(owner, user)
    assert [(e.kind, e.amount, e.balance_after) for e in entries[-3:]] == [
        ("void", 10, 20),
        ("refund", 10, 30),
        ("void", 10, 20),
    ]
    assert back["balance"] == 20
    await assert_consistent(owner, user)


# 7. VoidGrant.


async def test_void_removes_the_remainder_in_a_void_entry(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    gone = await grant_id(owner, user, 30)
    await give(owner, user, 5)
    await debit(owner, user, 10)
    voided = await void(owner, gone, key="void-1", description="chargeback")
    assert voided["transaction"]["kind"] == "void"
    assert (voided["transaction"]["amount"], voided["balance"]) == (20, 5)
    assert voided["transaction"]["description"] == "chargeback"
    assert allocations(voided) == [(gone, 20)]
    assert (voided["grant"]["state"], voided["grant"]["remaining"]) == ("voided", 0)
    replay = await void(owner, gone, key="void-1", description="chargeback")
    assert replay["replayed"] is True
    assert replay["transaction"] == voided["transaction"]
    # The same key for anything else is refused.
    await refused(
        owner,
        KEY_REUSED,
        "select public.credit_void_grant($1, 'void-1', 'other words')",
        gone,
    )
    await refused(
        owner, KEY_REUSED, "select public.credit_debit($1, 1, 'void-1', '', '{}'::jsonb)", user
    )
    await assert_consistent(owner, user)


async def test_void_with_pinned_credits_voids_them_when_their_hold_lets_go(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    gone = await grant_id(owner, user, 30)
    released = await reserve(owner, user, 10, ttl=600)
    captured = await reserve(owner, user, 8, ttl=600)
    voided = await void(owner, gone)
    assert (voided["transaction"]["amount"], voided["balance"]) == (12, 18)
    assert (voided["grant"]["state"], voided["grant"]["remaining"]) == ("voided", 18)
    seen = await profile(owner, user)
    assert (seen["balance"], seen["held"], seen["available"]) == (18, 18, 0)
    # A capture spends pinned credits of a voided grant; the rest is voided then.
    charged = await capture(owner, captured, 5)
    assert charged["balance"] == 10
    await call(owner, "select public.credit_release($1, null)", released)
    entries = await ledger(owner, user)
    assert [(e.kind, e.amount, e.balance_after) for e in entries] == [
        ("grant", 30, 30),
        ("void", 12, 18),
        ("capture", 5, 13),
        ("void", 3, 10),
        ("void", 10, 0),
    ]
    assert entries[3].metadata == {"hold_id": str(captured)}
    assert entries[4].metadata == {"hold_id": str(released)}
    replay = await capture(owner, captured, 5, charged["transaction"]["idempotency_key"])
    assert (replay["replayed"], replay["balance"]) == (True, 10)
    row = await stored(owner, gone)
    assert (row["remaining"], row["pinned"]) == (0, 0)
    assert (await listed(owner, user))[str(gone)]["state"] == "voided"
    await assert_consistent(owner, user)


async def test_a_voided_hold_expiry_voids_its_pinned_credits(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    gone = await grant_id(owner, user, 30)
    await reserve(owner, user, 10, ttl=60)
    await void(owner, gone)
    await advance(owner, timedelta(minutes=2))
    assert (await profile(owner, user))["balance"] == 0
    assert (await listed(owner, user))[str(gone)]["remaining"] == 0
    assert await sweep(owner) >= 1
    assert [(e.kind, e.amount) for e in await ledger(owner, user)] == [
        ("grant", 30),
        ("void", 20),
        ("void", 10),
    ]
    await assert_consistent(owner, user)


async def test_voiding_a_pending_grant_keeps_it_from_ever_counting(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    start = await now(owner)
    later = await grant_id(owner, user, 30, effective=start + timedelta(hours=1))
    voided = await void(owner, later)
    assert (voided["transaction"], voided["grant"]["state"], voided["balance"]) == (
        None,
        "voided",
        0,
    )
    await advance(owner, timedelta(hours=2))
    await sweep(owner)
    assert await ledger(owner, user) == []
    assert (await profile(owner, user))["balance"] == 0
    await assert_consistent(owner, user)


async def test_void_refuses_grants_that_are_not_active(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    other = await new_user(owner)
    start = await now(owner)
    expired = await grant_id(owner, user, 10, expire=start + timedelta(minutes=1))
    depleted = await grant_id(owner, user, 5, priority=1)
    voided = await grant_id(owner, user, 5)
    await debit(owner, user, 5)
    await void(owner, voided)
    await advance(owner, timedelta(minutes=2))
    query = "select public.credit_void_grant($1, $2, '', $3)"
    for grant, state in [(expired, "expired"), (depleted, "depleted"), (voided, "voided")]:
        detail = await refused(owner, GRANT_NOT_ACTIVE, query, grant, fresh_key(), None)
        assert detail == {"state": state}
    await refused(owner, GRANT_NOT_FOUND, query, uuid.uuid4(), fresh_key(), None)
    await refused(owner, GRANT_NOT_FOUND, query, expired, fresh_key(), other)
    # Named with its owner, found.
    await refused(owner, GRANT_NOT_ACTIVE, query, expired, fresh_key(), user)


async def test_a_user_session_cannot_void(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    grant = await grant_id(owner, user, 10)
    async with as_role(owner, "authenticated", claims_for(user)) as conn:
        await expect_sqlstate(
            conn, "42501", "select public.credit_void_grant($1, 'mine', '')", grant
        )
    async with as_role(owner, "service_role", SERVICE_CLAIMS) as conn:
        voided = await void(conn, grant)
    assert voided["grant"]["state"] == "voided"


# 8. Idempotent replays with the new parameters.


async def test_replays_of_grants_and_scoped_debits(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    start = await now(owner)
    options: dict[str, Any] = {
        "expire": start + timedelta(days=3),
        "priority": 7,
        "category": "promotional",
        "scopes": ["video"],
    }
    first = await give(owner, user, 40, key="g", **options)
    again = await give(owner, user, 40, key="g", **options)
    assert again["replayed"] is True
    assert (again["transaction"], again["grant"]) == (first["transaction"], first["grant"])
    for change in [{"priority": 8}, {"category": "paid"}, {"scopes": ["audio"]}, {"expire": None}]:
        with pytest.raises(asyncpg.PostgresError) as caught:
            await give(owner, user, 40, key="g", **{**options, **change})
        assert caught.value.sqlstate == KEY_REUSED
    spent = await debit(owner, user, 5, scope="video", key="d")
    replay = await debit(owner, user, 5, scope="video", key="d")
    assert (replay["replayed"], replay["transaction"]) == (True, spent["transaction"])
    assert replay["transaction"]["allocations"] == spent["transaction"]["allocations"]
    await refused(
        owner,
        KEY_REUSED,
        "select public.credit_debit($1, 5, 'd', '', '{}'::jsonb, 'audio')",
        user,
    )
    # A time that has passed since does not stop a replay.
    await advance(owner, timedelta(days=4))
    late = await give(owner, user, 40, key="g", **options)
    assert late["replayed"] is True
    assert late["grant"]["state"] == "expired"


async def test_batched_debits_take_a_scope_each(owner: asyncpg.Connection) -> None:
    one, two = await new_user(owner), await new_user(owner)
    await give(owner, one, 10, scopes=["video"])
    await give(owner, two, 10)
    rows = await owner.fetch(
        "select ordinal, result, error_code, error_detail from public.credit_debit_each("
        "$1::uuid[], array[4, 4, 4]::bigint[], array['b1', 'b2', 'b3'], array['', '', ''],"
        " array['{}', '{}', '{}']::jsonb[], array['video', '', 'video'])",
        [one, one, two],
    )
    outcome = {r["ordinal"]: (r["error_code"], r["error_detail"], r["result"]) for r in rows}
    assert outcome[1][0] is None
    assert json.loads(outcome[1][2])["balance"] == 6
    assert outcome[2][0] == INSUFFICIENT_CREDITS
    assert json.loads(outcome[2][1]) == {"required": 4, "available": 0, "scope": ""}
    assert json.loads(outcome[3][2])["balance"] == 6  # an unscoped grant pays for any scope
    await assert_consistent(owner, one)
    await assert_consistent(owner, two)


# 9. Signup credits and generations.


async def test_signup_credits_are_a_promotional_grant_that_expires(
    owner: asyncpg.Connection,
) -> None:
    before = await owner.fetchrow(
        "select signup_credits, signup_ttl_seconds from credits_private.settings"
    )
    assert before is not None
    await owner.execute("select public.credit_configure(25, 3600)")
    try:
        user = await new_user(owner)
    finally:
        await owner.execute("select public.credit_configure($1, $2)", *before)
    (signup,) = (await listed(owner, user)).values()
    assert (signup["category"], signup["priority"], signup["scopes"], signup["amount"]) == (
        "promotional",
        50,
        [],
        25,
    )
    start = await now(owner)
    expires = datetime.fromisoformat(signup["expire_time"])
    assert timedelta(minutes=59) < expires - start <= timedelta(hours=1)
    await advance(owner, timedelta(hours=2))
    assert (await profile(owner, user))["balance"] == 0
    await sweep(owner)
    assert [(e.kind, e.amount, e.key) for e in await ledger(owner, user)] == [
        ("grant", 25, None),
        ("expire", 25, None),
    ]
    await refused(owner, INVALID_ARGUMENT, "select public.credit_configure(1, 0)")


async def test_a_generation_is_reserved_with_its_model_as_the_scope(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner)
    scoped = await grant_id(owner, user, 5, scopes=["scope-model"])
    anything = await grant_id(owner, user, 100)
    async with rolled_back(owner):
        await owner.execute(
            "select public.credit_sync_models($1::jsonb)",
            json.dumps(
                [
                    {"model": m, "cost": 8, "timeout_seconds": 30, "max_attempts": 1}
                    for m in ("scope-model", "other-model")
                ]
            ),
        )
        created = await call(
            owner,
            "select public.credit_create_generation($1, 'scope-model', 'p', '{}'::jsonb, 'r1')",
            user,
        )
        hold = uuid.UUID(created["generation"]["hold_id"])
        pins = await owner.fetch(
            "select grant_id, amount from public.credit_hold_pins where hold_id = $1"
            " order by ordinal",
            hold,
        )
        assert [tuple(p) for p in pins] == [(scoped, 5), (anything, 3)]
        await debit(owner, user, 97)
        detail = await refused(
            owner,
            INSUFFICIENT_CREDITS,
            "select public.credit_create_generation($1, 'other-model', 'p', '{}'::jsonb, 'r2')",
            user,
        )
        assert detail == {"required": 8, "available": 0, "scope": "other-model"}
        await assert_consistent(owner, user)


# 10. Reads run with the caller's rights and count by time too.


async def test_a_users_own_session_reads_its_grants_by_time(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    other = await new_user(owner)
    start = await now(owner)
    await give(owner, user, 10, expire=start + timedelta(minutes=1))
    await give(owner, user, 20)
    hold = await reserve(owner, user, 5, ttl=30)
    await advance(owner, timedelta(minutes=2))
    async with as_role(owner, "authenticated", claims_for(user)) as conn:
        seen = await profile(conn, user)
        grants = await listed(conn, user)
        active = await listed(conn, user, ["active"])
        check = await call(conn, "select public.credit_check($1, 25, '')", user)
        await expect_sqlstate(conn, "CR003", "select public.credit_list_grants($1, 10)", other)
        await expect_sqlstate(conn, "CR003", "select public.credit_check($1, 1, '')", other)
    assert (seen["balance"], seen["held"], seen["available"]) == (20, 0, 20)
    assert sorted(g["state"] for g in grants.values()) == ["active", "expired"]
    assert [g["amount"] for g in active.values()] == [20]
    assert check == {"sufficient": False, "available": 20, "shortfall": 5}
    assert (
        await owner.fetchval("select state from public.credit_holds where hold_id = $1", hold)
        == "pending"
    )  # nothing written by reading
    await refused(
        owner, INVALID_ARGUMENT, "select public.credit_list_grants($1, 10, null, '{gone}')", user
    )


async def test_list_grants_pages_newest_first(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    made = [await grant_id(owner, user, n) for n in range(1, 6)]
    page = await call(owner, "select public.credit_list_grants($1, 2)", user)
    assert [uuid.UUID(g["grant_id"]) for g in page] == made[:2:-1][:2]
    rest = await call(owner, "select public.credit_list_grants($1, 10, $2)", user, page[-1]["seq"])
    assert [uuid.UUID(g["grant_id"]) for g in rest] == made[2::-1]


# 11. The invariant: a direct write that breaks it is refused at commit.


async def direct_write(owner: asyncpg.Connection, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Runs `statements` as the owner in one transaction; the commit raises if refused."""
    async with owner.transaction():
        for statement, args in statements:
            await owner.execute(statement, *args)


@pytest.mark.parametrize(
    "statement",
    [
        "update public.credit_grants set remaining = remaining - 1 where user_id = $1",
        "update public.credit_profiles set balance = balance - 1 where user_id = $1",
        "update public.credit_profiles set held = held + 1 where user_id = $1",
        "update public.credit_grants set pinned = pinned + 1 where user_id = $1",
        "update public.credit_hold_pins set amount = amount + 1 where user_id = $1",
        "update public.credit_holds set state = 'released' where user_id = $1",
        "update public.credit_grants set expired = true, remaining = 0, pinned = 0"
        " where user_id = $1",
        "update public.credit_profiles set next_settle_at = null where user_id = $1",
        "insert into public.credit_grants (user_id, amount, remaining, effective_at, activated,"
        " fingerprint, created_at) values ($1, 5, 5, now(), true, 'fp', now())",
    ],
)
async def test_a_direct_write_out_of_step_is_refused_at_commit(
    owner: asyncpg.Connection, statement: str
) -> None:
    user = await new_user(owner)
    start = await now(owner)
    await give(owner, user, 50, expire=start + timedelta(days=1))
    await reserve(owner, user, 10, ttl=600)
    before = await ledger(owner, user), await profile(owner, user)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await direct_write(owner, (statement, (user,)))
    assert caught.value.sqlstate == CHECK_VIOLATION
    assert "out of step" in str(caught.value)
    assert (await ledger(owner, user), await profile(owner, user)) == before
    await assert_consistent(owner, user)


async def test_a_debit_checks_the_books_it_leaves_at_once(owner: asyncpg.Connection) -> None:
    """A debit verifies its user's invariant in the statement that records it (not at commit),
    so a state broken before it in the transaction is refused by the debit itself."""
    user = await new_user(owner)
    await give(owner, user, 50)
    before = await ledger(owner, user)
    async with rolled_back(owner):
        await owner.execute(
            "update public.credit_grants set remaining = remaining - 1 where user_id = $1", user
        )
        await expect_sqlstate(
            owner,
            CHECK_VIOLATION,
            "select public.credit_debit($1, 1, 'after-a-bad-write', '', '{}'::jsonb)",
            user,
        )
    assert await ledger(owner, user) == before


@pytest.mark.parametrize(
    "statement",
    [
        "update public.credit_grants set remaining = remaining - 1 where user_id = $1",
        "update public.credit_profiles set balance = balance - 1 where user_id = $1",
    ],
)
async def test_a_write_after_a_debit_in_its_transaction_is_still_checked(
    owner: asyncpg.Connection, statement: str
) -> None:
    user = await new_user(owner)
    await give(owner, user, 50)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await direct_write(
            owner,
            ("select public.credit_debit($1, 1, 'then-a-bad-write', '', '{}'::jsonb)", (user,)),
            (statement, (user,)),
        )
    assert caught.value.sqlstate == CHECK_VIOLATION
    assert [e.kind for e in await ledger(owner, user)] == ["grant"]


async def test_a_direct_write_that_keeps_the_books_is_allowed(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    await give(owner, user, 50)
    await direct_write(
        owner,
        ("update public.credit_grants set remaining = remaining - 1 where user_id = $1", (user,)),
        ("update public.credit_profiles set balance = balance - 1 where user_id = $1", (user,)),
    )
    assert (await profile(owner, user))["balance"] == 49


@pytest.mark.parametrize(
    "assignment",
    ["remaining = amount + 1", "remaining = -1", "pinned = remaining + 1", "amount = 0"],
)
async def test_grant_bounds_are_checked_at_once(owner: asyncpg.Connection, assignment: str) -> None:
    user = await new_user(owner)
    await give(owner, user, 50)
    async with rolled_back(owner):
        await expect_sqlstate(
            owner,
            CHECK_VIOLATION,
            f"update public.credit_grants set {assignment} where user_id = $1",
            user,
        )


@pytest.mark.parametrize(
    "assignment",
    [
        "priority = 101",
        "category = 'free'",
        "scopes = '{\"\"}'",
        "metadata = '[]'",
        "expires_at = effective_at",
    ],
)
async def test_grant_fields_are_checked_when_written(
    owner: asyncpg.Connection, assignment: str
) -> None:
    user = await new_user(owner)
    await give(owner, user, 50, expire=(await now(owner)) + timedelta(days=1))
    async with rolled_back(owner):
        await expect_sqlstate(
            owner,
            CHECK_VIOLATION,
            f"update public.credit_grants set {assignment} where user_id = $1",
            user,
        )


# 12. Races: many debits against an expiry and against a void, never spending what is gone.


async def race(
    grants_db: str, user: uuid.UUID, calls: int, midway: Any
) -> tuple[list[Any], list[asyncpg.PostgresError]]:
    """`calls` debits of 1 from 10 connections; `midway()` runs, on a connection of its own,
    once a third of them are done, while the others are still being sent."""
    third = asyncio.Event()
    finished = 0

    async def one(pool: asyncpg.Pool, i: int) -> Any:
        nonlocal finished
        try:
            async with pool.acquire() as conn:
                return await debit(conn, user, 1, key=f"race-{i}")
        finally:
            finished += 1
            if finished >= calls // 3:
                third.set()

    async def in_the_middle() -> None:
        await third.wait()
        await midway()

    async with asyncpg.create_pool(grants_db, min_size=10, max_size=10) as pool:
        results = await asyncio.gather(
            in_the_middle(), *(one(pool, i) for i in range(calls)), return_exceptions=True
        )
    assert results[0] is None, results[0]
    results = results[1:]
    done = [r for r in results if isinstance(r, dict)]
    failed = [r for r in results if isinstance(r, asyncpg.PostgresError)]
    assert len(done) + len(failed) == calls, [r for r in results if not isinstance(r, dict)]
    return done, failed


async def test_two_hundred_debits_racing_an_expiry(
    owner: asyncpg.Connection, grants_db: str
) -> None:
    user = await new_user(owner)
    start = await now(owner)
    soon = await grant_id(owner, user, 150, expire=start + timedelta(hours=1), priority=10)
    lasting = await grant_id(owner, user, 100)

    async def expire() -> None:
        await advance(owner, timedelta(hours=2))

    done, failed = await race(grants_db, user, 200, expire)
    assert {e.sqlstate for e in failed} <= {INSUFFICIENT_CREDITS}
    entries = await ledger(owner, user)
    kinds = [e.kind for e in entries]
    assert kinds.count("expire") == 1
    assert kinds.count("debit") == len(done)
    expired_at = kinds.index("expire")
    # Nothing was spent from the expiring grant after its expiry was written.
    assert all(
        soon not in dict(e.allocations) for e in entries[expired_at + 1 :] if e.kind == "debit"
    )
    from_soon = sum(dict(e.allocations).get(soon, 0) for e in entries if e.kind == "debit")
    # It was a race: debits drew on the grant before its expiry, and others came after it.
    assert 0 < from_soon < 150
    assert kinds[expired_at + 1 :].count("debit") > 0
    assert entries[expired_at].allocations == ((soon, 150 - from_soon),)
    assert all(e.balance_after >= 0 for e in entries)
    assert sum(SIGNED[e.kind] * e.amount for e in entries) == entries[-1].balance_after
    assert (await stored(owner, lasting))["remaining"] == 100 - (len(done) - from_soon)
    assert not failed or (await stored(owner, lasting))["remaining"] == 0
    await assert_consistent(owner, user)


async def test_a_hundred_debits_racing_a_void(owner: asyncpg.Connection, grants_db: str) -> None:
    user = await new_user(owner)
    gone = await grant_id(owner, user, 100, priority=10)
    lasting = await grant_id(owner, user, 50)
    voided: list[Any] = []

    async def void_it() -> None:
        voided.append(await void(owner, gone))

    done, failed = await race(grants_db, user, 100, void_it)
    assert {e.sqlstate for e in failed} <= {INSUFFICIENT_CREDITS}
    entries = await ledger(owner, user)
    kinds = [e.kind for e in entries]
    assert kinds.count("void") == 1
    assert kinds.count("debit") == len(done)
    voided_at = kinds.index("void")
    assert all(
        gone not in dict(e.allocations) for e in entries[voided_at + 1 :] if e.kind == "debit"
    )
    from_gone = sum(dict(e.allocations).get(gone, 0) for e in entries if e.kind == "debit")
    assert 0 < from_gone < 100
    assert kinds[voided_at + 1 :].count("debit") > 0
    assert voided[0]["transaction"]["amount"] == 100 - from_gone
    assert entries[voided_at].allocations == ((gone, 100 - from_gone),)
    assert (await stored(owner, lasting))["remaining"] == 50 - (len(done) - from_gone)
    # Refused only once nothing was left that they could use.
    assert not failed or (await stored(owner, lasting))["remaining"] == 0
    assert sum(SIGNED[e.kind] * e.amount for e in entries) == entries[-1].balance_after >= 0
    await assert_consistent(owner, user)


# 13. Existing data: balances become grants, pending holds pin them.


async def test_existing_balances_and_holds_become_grants_and_pins(
    postgres_admin_url: str, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for migration in discover():
        if migration.version <= BEFORE_GRANTS:
            shutil.copy(str(migration.path), before / f"{migration.version}_{migration.name}.sql")
    url = await create_database(postgres_admin_url)
    try:
        await migrate(url, migrations_dir=before)
        conn = await asyncpg.connect(url)
        try:
            await check_conversion(conn, url)
        finally:
            await conn.close()
    finally:
        await drop_database(postgres_admin_url, url)


async def check_conversion(conn: asyncpg.Connection, url: str) -> None:
    rich, empty, spent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for user in (rich, empty, spent):
        await conn.execute("select public.credit_provision_profile($1, '')", user)
    # The functions as they were before grants.
    await conn.execute("select public.credit_grant($1, 100, 'old-grant', '', '{}')", rich)
    old_debit = json.loads(
        await conn.fetchval("select public.credit_debit($1, 20, 'old-debit', '', '{}')", rich)
    )
    held = json.loads(
        await conn.fetchval("select public.credit_reserve($1, 30, 'old-hold', 600, '')", rich)
    )
    overdue = json.loads(
        await conn.fetchval("select public.credit_reserve($1, 5, 'old-overdue', 60, '')", rich)
    )
    await conn.execute(
        "update public.credit_holds set expires_at = now() - interval '1 second'"
        " where hold_id = $1",
        uuid.UUID(overdue["hold"]["hold_id"]),
    )
    await conn.execute("select public.credit_grant($1, 10, 'g', '', '{}')", spent)
    await conn.execute("select public.credit_debit($1, 10, 'd', '', '{}')", spent)

    await migrate(url)

    grants = await conn.fetch(
        "select user_id, amount, remaining, pinned, category, priority, scopes, expires_at,"
        " activated, transaction_id from public.credit_grants order by user_id"
    )
    assert [tuple(g) for g in grants] == [(rich, 80, 80, 35, "paid", 50, [], None, True, None)]
    pins = await conn.fetch(
        "select h.idempotency_key, p.amount from public.credit_hold_pins p"
        " join public.credit_holds h using (hold_id) order by 1"
    )
    assert [tuple(p) for p in pins] == [("old-hold", 30), ("old-overdue", 5)]
    for user in (rich, empty, spent):
        await assert_consistent(conn, user)
    seen = await profile(conn, rich)
    assert (seen["balance"], seen["held"], seen["available"]) == (80, 30, 50)
    assert (await profile(conn, empty))["balance"] == 0

    # Old keys replay as before: a debit with no allocations, a grant with no grant.
    replay = await call(conn, "select public.credit_debit($1, 20, 'old-debit', '', '{}')", rich)
    assert (replay["replayed"], replay["transaction"]["allocations"]) == (True, [])
    replay = await call(conn, "select public.credit_grant($1, 100, 'old-grant', '', '{}')", rich)
    assert (replay["replayed"], replay["grant"]) == (True, None)

    # The overdue hold settles with the next call; the other is captured from the grant.
    (migrated,) = [
        g["grant_id"] for g in await conn.fetch("select grant_id from public.credit_grants")
    ]
    captured = await capture(conn, uuid.UUID(held["hold"]["hold_id"]), 30)
    assert allocations(captured) == [(migrated, 30)]
    assert (
        await conn.fetchval(
            "select state from public.credit_holds where hold_id = $1",
            uuid.UUID(overdue["hold"]["hold_id"]),
        )
        == "expired"
    )
    # Credits spent before grants come back as a grant of their own.
    back = await refund(conn, old_debit["transaction"]["transaction_id"], 15)
    (returned,) = allocations(back)
    assert returned[1] == 15
    assert returned[0] != migrated
    fresh = await stored(conn, returned[0])
    assert (fresh["amount"], fresh["remaining"], fresh["activated"]) == (15, 15, True)
    assert back["balance"] == 65
    await refused(
        conn,
        INSUFFICIENT_CREDITS,
        "select public.credit_debit($1, 1, 'nothing-left', '', '{}'::jsonb)",
        spent,
    )
    for user in (rich, empty, spent):
        await assert_consistent(conn, user)
