"""The events outbox in SQL (issue 19): every event is written in the transaction of the change
it reports, thresholds fire once per downward crossing and re-arm, and ListEvents pages through
the events in commit order without gaps or repeats while others write.

This module has a database of its own (its tests move the SQL clock and read every event).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.fixtures.database import migrated_database
from tests.fixtures.webhooks import until
from tests.integration.test_sql_security import expect_sqlstate

INSUFFICIENT_CREDITS = "CR001"
KEY_REUSED = "CR002"
INVALID_ARGUMENT = "CR008"


@pytest.fixture(scope="module")
async def events_db(postgres_admin_url: str) -> AsyncIterator[str]:
    """A database of this module's own, migrated: its tests move the clock and read every
    event."""
    async with migrated_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
async def owner(events_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(events_db)
    try:
        yield conn
    finally:
        await conn.execute("""update credits_private.clock set "offset" = '0'""")
        await conn.execute("select public.credit_configure_events('{}', 259200)")
        await conn.close()


async def fetch_json(conn: Any, query: str, *args: object) -> Any:
    value = await conn.fetchval(query, *args)
    return json.loads(value) if isinstance(value, str) else value


async def new_user(conn: asyncpg.Connection, credits: int = 0) -> uuid.UUID:
    user = uuid.uuid4()
    await conn.execute("select public.credit_provision_profile($1, '')", user)
    if credits:
        await grant(conn, user, credits, f"start-{user}")
    return user


async def grant(conn: Any, user: uuid.UUID, amount: int, key: str) -> None:
    await conn.execute("select public.credit_grant($1, $2, $3, '', '{}')", user, amount, key)


async def debit(conn: Any, user: uuid.UUID, amount: int, key: str) -> None:
    await conn.execute("select public.credit_debit($1, $2, $3, '', '{}')", user, amount, key)


async def events_of(conn: asyncpg.Connection, user: uuid.UUID) -> list[dict[str, Any]]:
    """The user's events as ListEvents shows them, in commit order."""
    rows = await conn.fetch(
        "select credits_private.event_json(e) as event from credits_private.events e"
        " where e.user_id = $1 order by e.xid, e.seq",
        user,
    )
    return [json.loads(row["event"]) for row in rows]


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def test_every_ledger_entry_has_one_transaction_created_event(
    owner: asyncpg.Connection,
) -> None:
    user = await new_user(owner, 100)
    await debit(owner, user, 30, "d1")
    events = await events_of(owner, user)
    assert types(events) == ["transaction.created", "transaction.created"]
    spent = events[1]["payload"]
    assert (spent["kind"], spent["amount"], spent["balance_after"]) == ("debit", 30, 70)
    assert spent["idempotency_key"] == "d1"
    assert len(spent["allocations"]) == 1
    assert "seq" not in spent
    ledger = await owner.fetchval(
        "select transaction_id from public.credit_transactions where user_id = $1"
        " and idempotency_key = 'd1'",
        user,
    )
    assert spent["transaction_id"] == str(ledger)
    # A replay writes nothing: no second entry, no second event.
    await debit(owner, user, 30, "d1")
    assert len(await events_of(owner, user)) == 2


async def test_a_refused_or_rolled_back_debit_writes_no_event(owner: asyncpg.Connection) -> None:
    user = await new_user(owner, 100)
    await owner.execute("select public.credit_set_balance_alerts($1, array[50]::bigint[])", user)
    await debit(owner, user, 10, "used")
    before = await events_of(owner, user)
    await expect_sqlstate(
        owner, INSUFFICIENT_CREDITS, "select public.credit_debit($1, 1000, 'big', '', '{}')", user
    )
    await expect_sqlstate(
        owner, KEY_REUSED, "select public.credit_debit($1, 85, 'used', '', '{}')", user
    )
    assert await events_of(owner, user) == before
    # Written, then rolled back: its events go with it.
    undone = owner.transaction()
    await undone.start()
    await debit(owner, user, 90, "undone")
    inside = types((await events_of(owner, user))[len(before) :])
    assert sorted(inside) == ["balance.depleted", "balance.low", "transaction.created"]
    await undone.rollback()
    assert await events_of(owner, user) == before


async def test_200_concurrent_debits_fire_low_and_depleted_once(events_db: str) -> None:
    pool = await asyncpg.create_pool(events_db, min_size=10, max_size=10)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await conn.execute("select public.credit_configure_events('{100}', 259200)")
            user = await new_user(conn, 200)  # type: ignore[arg-type]
        await asyncio.gather(*(debit(pool, user, 1, f"c{i}") for i in range(200)))
        async with pool.acquire() as conn:
            events = await events_of(conn, user)  # type: ignore[arg-type]
            await conn.execute("select public.credit_configure_events('{}', 259200)")
    finally:
        await pool.close()
    counted = types(events)
    assert counted.count("transaction.created") == 201
    assert counted.count("balance.low") == 1
    assert counted.count("balance.depleted") == 1
    low = next(e for e in events if e["type"] == "balance.low")["payload"]
    assert (low["threshold"], low["available"]) == (100, 99)


async def test_thresholds_rearm_after_a_grant(owner: asyncpg.Connection) -> None:
    user = await new_user(owner, 100)
    profile = await fetch_json(
        owner, "select public.credit_set_balance_alerts($1, array[20, 50]::bigint[])", user
    )
    assert profile["low_balance_thresholds"] == [20, 50]
    assert profile["low_balance_thresholds_default"] is False
    await debit(owner, user, 60, "a")  # 40: below 50
    await debit(owner, user, 5, "b")  # 35: nothing new
    await debit(owner, user, 25, "c")  # 10: below 20
    await grant(owner, user, 30, "g1")  # 40: 20 re-armed, 50 not yet: no recovery
    await debit(owner, user, 25, "d")  # 15: below 20 again
    await grant(owner, user, 100, "g2")  # 115: above 50: recovered
    await debit(owner, user, 70, "e")  # 45: below 50 again
    lows = [
        (e["type"], e["payload"].get("threshold"), e["payload"]["available"])
        for e in await events_of(owner, user)
        if e["type"] != "transaction.created"
    ]
    assert lows == [
        ("balance.low", 50, 40),
        ("balance.low", 20, 10),
        ("balance.low", 20, 15),
        ("balance.recovered", None, 115),
        ("balance.low", 50, 45),
    ]
    # Back to the defaults: GetProfile's read shows them.
    await owner.execute("select public.credit_configure_events('{5, 7}', 259200)")
    back = await fetch_json(owner, "select public.credit_set_balance_alerts($1, null)", user)
    assert back["low_balance_thresholds"] == [5, 7]
    assert back["low_balance_thresholds_default"] is True
    await expect_sqlstate(
        owner,
        INVALID_ARGUMENT,
        "select public.credit_set_balance_alerts($1, array[5, 0]::bigint[])",
        user,
    )


async def test_a_hold_counts_against_available(owner: asyncpg.Connection) -> None:
    user = await new_user(owner, 100)
    await owner.execute("select public.credit_set_balance_alerts($1, array[50]::bigint[])", user)
    await owner.execute("select public.credit_reserve($1, 60, 'h', 60, '')", user)
    assert types(await events_of(owner, user))[-1] == "balance.low"


async def test_grant_expiring_once_then_expired(owner: asyncpg.Connection) -> None:
    user = await new_user(owner)
    await owner.execute(
        "select public.credit_grant($1, 40, 'monthly', '', '{}', now() + interval '10 days')", user
    )
    assert await owner.fetchval("select public.credit_notice_expiring_grants(1000)") >= 0
    assert "grant.expiring" not in types(await events_of(owner, user))
    await owner.execute("""update credits_private.clock set "offset" = '8 days'""")
    await owner.fetchval("select public.credit_notice_expiring_grants(1000)")
    await owner.fetchval("select public.credit_notice_expiring_grants(1000)")
    expiring = [e for e in await events_of(owner, user) if e["type"] == "grant.expiring"]
    assert len(expiring) == 1
    assert (expiring[0]["payload"]["remaining"], expiring[0]["payload"]["state"]) == (40, "active")
    await owner.execute("""update credits_private.clock set "offset" = '11 days'""")
    await owner.execute("select public.credit_expire_holds(1000000)")
    after = await events_of(owner, user)
    expired = [e for e in after if e["type"] == "grant.expired"]
    assert len(expired) == 1
    assert (expired[0]["payload"]["state"], expired[0]["payload"]["amount"]) == ("expired", 40)
    assert types(after).count("balance.depleted") == 1


async def test_a_debit_writes_its_events_once_in_order_whether_it_alerts_or_not(
    owner: asyncpg.Connection, events_db: str
) -> None:
    """A debit that crosses no threshold and one that does: one transaction.created per entry,
    after the balance events of its change, and one announcement per change to a watcher, also
    for an entry written after a debit in the same transaction."""
    user = await new_user(owner, 100)
    await owner.execute("select public.credit_set_balance_alerts($1, array[50]::bigint[])", user)
    await owner.execute("select public.credit_watch_balance($1, 60)", user)
    listener = await asyncpg.connect(events_db)
    announced: list[int] = []

    def note(*args: Any) -> None:
        change = json.loads(args[3])
        if change["user_id"] == str(user):
            announced.append(change["available"])

    await listener.add_listener("credit_balances", note)
    try:
        async with owner.transaction():
            await debit(owner, user, 10, "quiet")  # 90
            await debit(owner, user, 45, "crossing")  # 45: below 50
            await grant(owner, user, 5, "after")  # 50: back at 50
        for _ in range(100):
            if len(announced) == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await listener.close()
    events = await events_of(owner, user)
    described = [
        (e["type"], e["payload"].get("idempotency_key"), e["payload"].get("threshold"))
        for e in events[1:]
    ]
    assert described == [
        ("transaction.created", "quiet", None),
        ("balance.low", None, 50),
        ("transaction.created", "crossing", None),
        ("balance.recovered", None, None),
        ("transaction.created", "after", None),
    ]
    assert announced == [90, 45, 50]


async def test_a_batch_with_a_refused_call_writes_each_other_debit_and_event_once(
    owner: asyncpg.Connection,
) -> None:
    """credit_debit_each runs a batch in one subtransaction and, when a call fails, again call
    by call: the calls before it are not written twice, the failed one is answered with its
    error, and those after it run."""
    first, second, third = sorted([await new_user(owner, 100) for _ in range(3)])
    rows = await owner.fetch(
        "select ordinal, result, error_code from public.credit_debit_each("
        "$1::uuid[], array[10, 500, 20]::bigint[], array['b1', 'b2', 'b3'],"
        " array['', '', ''], array['{}', '{}', '{}']::jsonb[])",
        [first, second, third],
    )
    outcomes = {row["ordinal"]: (row["error_code"], row["result"]) for row in rows}
    assert outcomes[2] == (INSUFFICIENT_CREDITS, None)
    assert json.loads(outcomes[1][1])["balance"] == 90
    assert json.loads(outcomes[3][1])["balance"] == 80
    for user, entries in ((first, 2), (second, 1), (third, 2)):
        assert types(await events_of(owner, user)) == ["transaction.created"] * entries
        written = await owner.fetchval(
            "select count(*) from public.credit_transactions where user_id = $1", user
        )
        assert written == entries


async def test_list_events_pages_without_gaps_or_repeats_while_others_write(
    events_db: str, owner: asyncpg.Connection
) -> None:
    users = [await new_user(owner, 1000) for _ in range(4)]
    start = await fetch_json(owner, "select public.credit_list_events(null, null, 1000)")
    while len(start) == 1000:
        start = await fetch_json(
            owner,
            "select public.credit_list_events($1, null, 1000)",
            uuid.UUID(start[-1]["event_id"]),
        )
    cursor = uuid.UUID(start[-1]["event_id"]) if start else None
    pool = await asyncpg.create_pool(events_db, min_size=4, max_size=4)
    assert pool is not None
    seen: list[str] = []

    async def write(writer: int) -> None:
        for i in range(40):
            await debit(pool, users[i % 4], 1, f"w{writer}-{i}")

    async def read() -> None:
        nonlocal cursor
        for _ in range(200):
            page = await fetch_json(owner, "select public.credit_list_events($1, null, 7)", cursor)
            if page:
                seen.extend(e["event_id"] for e in page)
                cursor = uuid.UUID(page[-1]["event_id"])
            await asyncio.sleep(0.002)

    try:
        await asyncio.gather(*(write(n) for n in range(3)), read())
    finally:
        await pool.close()
    rest = await fetch_json(owner, "select public.credit_list_events($1, null, 1000)", cursor)
    seen.extend(e["event_id"] for e in rest)
    written = await owner.fetch(
        "select credits_private.event_id(xid, seq)::text as event_id from credits_private.events"
        " where user_id = any($1::uuid[])"
        " and type = 'transaction.created' and transaction_id in (select transaction_id"
        " from public.credit_transactions where idempotency_key like 'w%')",
        users,
    )
    assert len(written) == 120
    assert len(seen) == len(set(seen))
    assert {r["event_id"] for r in written} <= set(seen)
    # By type: only the debits' events, in the same order.
    typed = await fetch_json(
        owner, "select public.credit_list_events(null, array['balance.low'], 1000)"
    )
    assert {e["type"] for e in typed} <= {"balance.low"}
    await expect_sqlstate(
        owner, INVALID_ARGUMENT, "select public.credit_list_events(null, array['nope'], 10)"
    )
    await expect_sqlstate(
        owner, INVALID_ARGUMENT, "select public.credit_list_events($1, null, 10)", uuid.uuid4()
    )


async def test_generation_final_states_are_events(owner: asyncpg.Connection) -> None:
    user = await new_user(owner, 100)
    await owner.execute(
        "select public.credit_sync_models($1::jsonb)",
        json.dumps(
            [
                {
                    "model": "ev-model",
                    "cost": 5,
                    "description": "",
                    "timeout_seconds": 60,
                    "max_attempts": 1,
                }
            ]
        ),
    )
    created = await fetch_json(
        owner,
        "select public.credit_create_generation($1, 'ev-model', 'a cat', '{}'::jsonb, 'r1')",
        user,
    )
    generation = uuid.UUID(created["generation"]["generation_id"])
    await owner.execute("select public.credit_cancel_generation($1, null)", generation)
    ended = [e for e in await events_of(owner, user) if e["type"].startswith("generation.")]
    assert [e["type"] for e in ended] == ["generation.cancelled"]
    assert ended[0]["payload"]["state"] == "cancelled"
    assert "output" not in ended[0]["payload"]


async def dispatch_all(conn: Any) -> None:
    while await conn.fetchval("select public.credit_dispatch_events(1000)") == 1000:
        pass


async def test_an_endpoint_removed_while_its_events_are_dispatched_fails_neither(
    owner: asyncpg.Connection, events_db: str
) -> None:
    await dispatch_all(owner)
    endpoint = await fetch_json(
        owner,
        "select public.credit_add_webhook('http://127.0.0.1:9/hook', '{}', $1)",
        "whsec_" + "A" * 32,
    )
    await new_user(owner, 10)  # an event for the endpoint
    remover, dispatcher = await asyncpg.connect(events_db), await asyncpg.connect(events_db)
    try:
        removal = remover.transaction()
        await removal.start()
        await remover.execute(
            "select public.credit_remove_webhook($1)", uuid.UUID(endpoint["endpoint_id"])
        )
        # The dispatch's snapshot still shows the endpoint; it waits for the removal's lock.
        dispatched = asyncio.create_task(
            dispatcher.fetchval("select public.credit_dispatch_events(1000)")
        )
        waiting = "select wait_event_type = 'Lock' from pg_stat_activity where pid = $1"

        async def dispatch_waits() -> bool:
            return bool(await owner.fetchval(waiting, dispatcher.get_server_pid()))

        await until(dispatch_waits)
        await removal.commit()
        assert await asyncio.wait_for(dispatched, 10) >= 1  # passed, the removed endpoint skipped
    finally:
        await remover.close()
        await dispatcher.close()
    left = "select count(*) from credits_private.webhook_deliveries where endpoint_id = $1"
    assert await owner.fetchval(left, uuid.UUID(endpoint["endpoint_id"])) == 0
