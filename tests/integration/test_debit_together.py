"""A batch of debits in a few statements (credits_private.debit_together, issue 21): the debits
it takes answer and write exactly what credit_debit would, one by one; the others (replays,
refusals, a debit past a spend limit, a user's second call, a debit two grants share) are
left to credit_debit; and when its statement fails, every call goes one by one.

This module has a database of its own (one test adds a trigger to the ledger).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.fixtures.database import migrated_database
from tests.integration.test_sql_security import expect_sqlstate, rolled_back

INSUFFICIENT_PRIVILEGE = "42501"
EACH = (
    "select ordinal, result, error_code, error_message, error_detail"
    " from public.credit_debit_each($1::uuid[], $2::bigint[], $3::text[], $4::text[],"
    " $5::jsonb[], $6::text[])"
)
TOGETHER = (
    "select ordinal from credits_private.debit_together($1::uuid[], $2::bigint[], $3::text[],"
    " $4::text[], $5::jsonb[], $6::text[]) order by ordinal"
)
ONE = "select public.credit_debit($1, $2, $3, $4, $5::jsonb, $6)"
# The times of grants that expire: the same in both worlds, so that their rows compare.
START = datetime.now(UTC)


@pytest.fixture(scope="module")
async def together_db(postgres_admin_url: str) -> AsyncIterator[str]:
    async with migrated_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
async def owner(together_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(together_db)
    try:
        yield conn
    finally:
        await conn.close()


@dataclass(frozen=True)
class Call:
    """One debit of a batch: whose (a slot of the world), how much, its key and the rest."""

    slot: str
    amount: int
    key: str
    description: str = ""
    metadata: str = "{}"
    scope: str = ""


@dataclass
class World:
    """Users set up alike, slot by slot, so that two worlds can be debited two ways."""

    users: dict[str, uuid.UUID] = field(default_factory=dict)

    def user(self, slot: str) -> uuid.UUID:
        return self.users[slot]

    def names(self) -> dict[str, str]:
        return {str(user): slot for slot, user in self.users.items()}


async def grant(
    conn: asyncpg.Connection,
    user: uuid.UUID,
    amount: int,
    key: str,
    scopes: list[str] | None = None,
    expires: datetime | None = None,
) -> None:
    await conn.execute(
        "select public.credit_grant($1, $2, $3, '', '{}', $5, null, 50, 'paid', $4::text[])",
        user,
        amount,
        key,
        scopes or [],
        expires,
    )


Setup = Callable[[asyncpg.Connection, uuid.UUID], Any]


async def plain(conn: asyncpg.Connection, user: uuid.UUID) -> None:
    await grant(conn, user, 100, "g1")


async def alerted(conn: asyncpg.Connection, user: uuid.UUID) -> None:
    await grant(conn, user, 100, "g1")
    await conn.execute("select public.credit_set_balance_alerts($1, array[50]::bigint[])", user)


async def scoped(conn: asyncpg.Connection, user: uuid.UUID) -> None:
    await grant(conn, user, 50, "g1")
    await grant(conn, user, 50, "g2", ["model-a"])


async def expiring(conn: asyncpg.Connection, user: uuid.UUID) -> None:
    await grant(conn, user, 100, "g1", expires=START + timedelta(days=2))


async def expired(conn: asyncpg.Connection, user: uuid.UUID) -> None:
    """A grant that expired a minute ago, by its time moved as the owner: due to settle."""
    await grant(conn, user, 30, "g1", expires=START + timedelta(hours=1))
    await grant(conn, user, 100, "g2")
    await conn.execute(
        "update public.credit_grants set effective_at = $2, expires_at = $3"
        " where user_id = $1 and expires_at is not null",
        user,
        START - timedelta(minutes=2),
        START - timedelta(minutes=1),
    )


async def two_grants(conn: asyncpg.Connection, user: uuid.UUID) -> None:
    await grant(conn, user, 30, "g1")
    await grant(conn, user, 30, "g2")


async def poor(conn: asyncpg.Connection, user: uuid.UUID) -> None:
    await grant(conn, user, 20, "g1")


async def debited_before(conn: asyncpg.Connection, user: uuid.UUID) -> None:
    await grant(conn, user, 100, "g1")
    await conn.execute(ONE, user, 5, "again", "", "{}", "")


async def holding(conn: asyncpg.Connection, user: uuid.UUID) -> None:
    await grant(conn, user, 100, "g1")
    await conn.execute("select public.credit_reserve($1, 90, 'held', 3600)", user)


def limited(period: str, limit: int, spent: int = 0) -> Setup:
    """A user with 100 credits, a spend limit of `limit` a `period`, and `spent` of it spent."""

    async def setup(conn: asyncpg.Connection, user: uuid.UUID) -> None:
        await grant(conn, user, 100, "g1")
        await conn.execute("select public.credit_set_spend_limit($1, $2, $3)", user, period, limit)
        if spent:
            await conn.execute(ONE, user, spent, "spent", "", "{}", "")

    return setup


SETUPS: dict[str, Setup] = {
    "plain": plain,
    "described": plain,
    "low": alerted,
    "depleted": plain,
    "scoped": scoped,
    "expiring": expiring,
    "expired": expired,
    "two-grants": two_grants,
    "poor": poor,
    "replay": debited_before,
    "debited-today": debited_before,
    "key-of-a-hold": holding,
    "pinned": holding,
    "twice": plain,
    "day-limit-kept": limited("day", 15),
    "day-limit-passed": limited("day", 5),
    "day-limit-spent": limited("day", 15, spent=10),
    "week-limit-kept": limited("week", 50, spent=10),
    "month-limit-passed": limited("month", 15, spent=10),
    "zero": plain,
    "bad-scope": plain,
}

# One batch: the debits debit_together takes, and every kind it leaves to credit_debit.
BATCH = [
    Call("plain", 10, "d1"),
    Call("described", 7, "d1", "an image", '{"model": "m", "n": 2}'),
    Call("low", 60, "d1"),
    Call("depleted", 100, "d1"),
    Call("scoped", 10, "d1", scope="model-a"),
    Call("expiring", 10, "d1"),
    Call("expired", 10, "d1"),
    Call("two-grants", 50, "d1"),
    Call("poor", 50, "d1"),
    Call("replay", 5, "again"),
    Call("debited-today", 5, "d1"),
    Call("key-of-a-hold", 1, "held"),
    Call("pinned", 5, "d1"),
    Call("twice", 10, "d1"),
    Call("twice", 20, "d2"),
    Call("day-limit-kept", 10, "d1"),
    Call("day-limit-passed", 10, "d1"),
    Call("day-limit-spent", 10, "d1"),
    Call("week-limit-kept", 10, "d1"),
    Call("month-limit-passed", 10, "d1"),
    Call("zero", 0, "d1"),
    Call("bad-scope", 1, "d1", scope="x" * 101),
    Call("nobody", 1, "d1"),
]
TAKEN = {
    "plain",
    "described",
    "low",
    "depleted",
    "scoped",
    "expiring",
    "pinned",
    "debited-today",
    "day-limit-kept",
    "week-limit-kept",
}


async def world(conn: asyncpg.Connection) -> World:
    made = World()
    for slot, setup in SETUPS.items():
        user = uuid.uuid4()
        await conn.execute("select public.credit_provision_profile($1, '')", user)
        await setup(conn, user)
        made.users[slot] = user
    made.users["nobody"] = uuid.uuid4()  # no profile
    return made


def columns(made: World, calls: list[Call]) -> list[object]:
    return [
        [made.user(c.slot) for c in calls],
        [c.amount for c in calls],
        [c.key for c in calls],
        [c.description for c in calls],
        [c.metadata for c in calls],
        [c.scope for c in calls],
    ]


def normal(value: Any, made: World, grants: dict[str, int]) -> Any:
    """`value` with what differs between two worlds named instead: users by slot, grants by
    their order; ids, sequence numbers and times dropped."""
    if isinstance(value, dict):
        return {
            key: normal(item, made, grants)
            for key, item in value.items()
            if key not in ("transaction_id", "seq", "create_time", "update_time")
        }
    if isinstance(value, list):
        return [normal(item, made, grants) for item in value]
    if isinstance(value, str):
        for user, slot in made.names().items():
            value = value.replace(user, slot)
        for grant_id, position in grants.items():
            value = value.replace(grant_id, f"grant-{position}")
    return value


async def grant_positions(conn: asyncpg.Connection, made: World) -> dict[str, int]:
    rows = await conn.fetch(
        "select grant_id::text, user_id from public.credit_grants"
        " where user_id = any($1::uuid[]) order by seq",
        list(made.users.values()),
    )
    positions: dict[str, int] = {}
    per_user: dict[uuid.UUID, int] = {}
    for row in rows:
        per_user[row["user_id"]] = per_user.get(row["user_id"], 0) + 1
        positions[row["grant_id"]] = per_user[row["user_id"]]
    return positions


async def state(conn: asyncpg.Connection, made: World) -> dict[str, Any]:
    """Everything a debit writes, per slot, as the other world can show it too."""
    grants = await grant_positions(conn, made)
    found: dict[str, Any] = {}
    for slot, user in made.users.items():
        queries = {
            "profile": "select balance, held from public.credit_profiles where user_id = $1",
            "grants": "select remaining, pinned from public.credit_grants where user_id = $1"
            " order by seq",
            # (other entries' fingerprints hash the grant or hold they name: ids that differ)
            "ledger": "select kind, amount, balance_after, idempotency_key,"
            " case when kind = 'debit' then fingerprint end as fingerprint,"
            " description, metadata::text, scope from public.credit_transactions"
            " where user_id = $1 order by seq",
            "allocations": "select a.grant_id::text, a.ordinal, a.amount"
            " from public.credit_allocations a join public.credit_transactions t"
            " using (transaction_id) where t.user_id = $1 order by t.seq, a.ordinal",
            "usage": "select day, kind, scope, category, amount, hours::text"
            " from public.credit_usage where user_id = $1 order by day, kind, scope, category",
            "spending": "select day, spent from public.credit_spend_days where user_id = $1",
            "events": "select credits_private.event_json(e) - 'event_id' as event"
            " from credits_private.events e where e.user_id = $1 order by e.xid, e.seq",
        }
        found[slot] = {
            name: normal(
                [
                    {k: json.loads(v) if k == "event" else v for k, v in dict(row).items()}
                    for row in await conn.fetch(query, user)
                ],
                made,
                grants,
            )
            for name, query in queries.items()
        }
    return found


async def test_a_batch_answers_and_writes_as_its_calls_one_by_one(
    owner: asyncpg.Connection,
) -> None:
    """The same debits, in a batch and one by one (each its own transaction), on users set up
    alike: every answer, error and row written is the same, as are the events."""
    batched, alone = await world(owner), await world(owner)
    rows = await owner.fetch(EACH, *columns(batched, BATCH))
    by_batch: list[Any] = [None] * len(BATCH)
    for row in rows:
        outcome = (
            {"result": json.loads(row["result"])}
            if row["error_code"] is None
            else {k: row[k] for k in ("error_code", "error_message", "error_detail")}
        )
        by_batch[row["ordinal"] - 1] = outcome
    by_one: list[Any] = []
    for call in BATCH:
        try:
            result = await owner.fetchval(ONE, *(column[0] for column in columns(alone, [call])))
            by_one.append({"result": json.loads(result)})
        except asyncpg.PostgresError as exc:
            by_one.append(
                {
                    "error_code": exc.sqlstate,
                    "error_message": exc.message,
                    "error_detail": exc.detail or "",
                }
            )

    batch_grants = await grant_positions(owner, batched)
    alone_grants = await grant_positions(owner, alone)
    for call, mine, theirs in zip(BATCH, by_batch, by_one, strict=True):
        assert normal(mine, batched, batch_grants) == normal(theirs, alone, alone_grants), call
    assert await state(owner, batched) == await state(owner, alone)
    # The batch exercised both roads: debits taken together, refusals, and credit_debit's.
    assert {c.slot for c, o in zip(BATCH, by_batch, strict=True) if "result" in o} >= TAKEN
    assert {c.slot for c, o in zip(BATCH, by_batch, strict=True) if "error_code" in o} == {
        "poor",
        "key-of-a-hold",
        "day-limit-passed",
        "day-limit-spent",
        "month-limit-passed",
        "zero",
        "bad-scope",
        "nobody",
    }


async def test_it_takes_only_the_debits_of_the_common_road(owner: asyncpg.Connection) -> None:
    """debit_together's own answer names the debits it did: single calls of users with
    nothing to settle, no limit, a fresh valid key and a first grant that covers them."""
    made = await world(owner)
    async with rolled_back(owner):
        taken = [r["ordinal"] for r in await owner.fetch(TOGETHER, *columns(made, BATCH))]
    assert {BATCH[n - 1].slot for n in taken} == TAKEN


@pytest.mark.parametrize("limits", [(5, None), (None, 5)], ids=["daily", "monthly"])
async def test_a_default_spend_limit_is_judged_for_every_user(
    owner: asyncpg.Connection, limits: tuple[int | None, int | None]
) -> None:
    """A default limit applies to every user: debit_together takes the debit within it, and
    leaves the one past it to credit_debit, which refuses it."""
    made = await world(owner)
    calls = [Call("plain", 10, "d1"), Call("described", 1, "d1")]
    await owner.execute("select public.credit_configure_limits($1, $2, 8)", *limits)
    try:
        async with rolled_back(owner):
            taken = [r["ordinal"] for r in await owner.fetch(TOGETHER, *columns(made, calls))]
        rows = await owner.fetch(EACH, *columns(made, calls))
    finally:
        await owner.execute("select public.credit_configure_limits(null, null, 8)")
    assert taken == [2]
    assert sorted((r["ordinal"], r["error_code"]) for r in rows) == [(1, "CR020"), (2, None)]


async def test_when_its_statement_fails_every_call_goes_one_by_one(
    owner: asyncpg.Connection,
) -> None:
    """A ledger entry refused by the database (here by a trigger on one key) fails
    debit_together's one statement: it is undone, and credit_debit, call by call, writes each
    other debit once and answers the refused one with its error."""
    made = await world(owner)
    await owner.execute(
        """
        create function credits_private.refuse_boom() returns trigger language plpgsql as $$
        begin
          raise exception using errcode = 'P0001', message = 'boom';
        end $$;
        create trigger refuse_boom before insert on public.credit_transactions
          for each row when (new.idempotency_key = 'boom')
          execute function credits_private.refuse_boom();
        """
    )
    try:
        calls = [Call("plain", 10, "d1"), Call("described", 10, "boom"), Call("low", 10, "d1")]
        rows = await owner.fetch(EACH, *columns(made, calls))
    finally:
        await owner.execute(
            "drop trigger refuse_boom on public.credit_transactions;"
            " drop function credits_private.refuse_boom()"
        )
    outcomes = {r["ordinal"]: (r["error_code"], r["error_message"]) for r in rows}
    assert outcomes[2] == ("P0001", "boom")
    for ordinal in (1, 3):
        assert outcomes[ordinal] == (None, None)
    for slot, entries in (("plain", 2), ("described", 1), ("low", 2)):
        written = await owner.fetchval(
            "select count(*) from public.credit_transactions where user_id = $1",
            made.user(slot),
        )
        assert written == entries, slot


async def test_a_users_own_session_cannot_call_it(owner: asyncpg.Connection) -> None:
    """Only the service role (behind credit_debit_each) may: it debits any user."""
    made = await world(owner)
    user = made.user("plain")
    claims = json.dumps({"sub": str(user), "role": "authenticated"})
    async with rolled_back(owner):
        await owner.execute(
            "select set_config('role', 'authenticated', true),"
            " set_config('request.jwt.claims', $1, true)",
            claims,
        )
        await expect_sqlstate(
            owner, INSUFFICIENT_PRIVILEGE, TOGETHER, *columns(made, [Call("plain", 1, "x")])
        )
    privileged = await owner.fetch(
        "select r.rolname from pg_roles r where has_function_privilege(r.oid,"
        " 'credits_private.debit_together(uuid[], bigint[], text[], text[], jsonb[], text[])',"
        " 'execute') and r.rolname in ('anon', 'authenticated', 'service_role', 'public')"
    )
    assert [r["rolname"] for r in privileged] == ["service_role"]
