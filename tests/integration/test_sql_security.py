"""Row-level security, grants and constraints protect the money, tested in SQL on the real schema.

Each test acts as the roles a Supabase project has, the way PostgREST does: inside a transaction,
`set_config('role', ..., true)` and `set_config('request.jwt.claims', ..., true)`. Data is set up
as the owner (the superuser connection, no role set) through the schema's own functions. The
session's database is shared, so every test works on fresh user ids; statements that could
destroy shared rows if they wrongly succeeded run in transactions that are always rolled back.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeAlias

import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy
Role: TypeAlias = Literal["anon", "authenticated", "service_role"]

TABLES = (
    "credit_profiles",
    "credit_transactions",
    "credit_holds",
    "credit_generations",
    "credit_grants",
    "credit_allocations",
    "credit_hold_pins",
    "credit_spend_limits",
    "credit_spend_days",
    "credit_usage",
)
INSUFFICIENT_PRIVILEGE = "42501"
CHECK_VIOLATION = "23514"
INSUFFICIENT_CREDITS = "CR001"
KEY_REUSED = "CR002"
PROFILE_NOT_FOUND = "CR003"
HOLD_NOT_FOUND = "CR004"
BALANCE_LIMIT_EXCEEDED = "CR011"
TRANSACTION_NOT_FOUND = "CR006"
GENERATION_NOT_FOUND = "CR009"
GRANT_NOT_FOUND = "CR012"
INVALID_ARGUMENT = "CR008"
GRANT_SIGNATURE = (
    "credit_grant(uuid, bigint, text, text, jsonb, timestamp with time zone,"
    " timestamp with time zone, integer, text, text[])"
)
LEDGER_SUM = """
    select coalesce(sum(case when kind in ('grant', 'refund') then amount else -amount end), 0)
      from public.credit_transactions where user_id = $1
"""


def claims_for(user_id: uuid.UUID, **extra: str) -> dict[str, str]:
    """The JWT claims of a signed-in user's own session."""
    return {"sub": str(user_id), "role": "authenticated", **extra}


ANON_CLAIMS = {"role": "anon"}
SERVICE_CLAIMS = {"role": "service_role"}


@asynccontextmanager
async def as_role(conn: Conn, role: Role, claims: Mapping[str, object]) -> AsyncIterator[Conn]:
    """A transaction on `conn` acting as `role` with JWT `claims`, as PostgREST sets it up.

    Inside an enclosing transaction it is a savepoint, whose release would keep the role until
    the enclosing transaction ends: so the block ends by acting as the owner again.
    """
    async with conn.transaction():
        await conn.execute(
            "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true)",
            role,
            json.dumps(claims),
        )
        yield conn
        await conn.execute(
            "select set_config('role', 'none', true), set_config('request.jwt.claims', '', true)"
        )


@asynccontextmanager
async def rolled_back(conn: Conn) -> AsyncIterator[Conn]:
    """A transaction on `conn` that is rolled back however the block ends."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield conn
    finally:
        await transaction.rollback()


async def expect_sqlstate(conn: Conn, sqlstate: str, query: str, *args: object) -> Any:
    """Run `query` in a savepoint and return its error; fails unless it fails with `sqlstate`.

    The savepoint keeps an enclosing transaction usable after the expected error.
    """
    with pytest.raises(asyncpg.PostgresError) as caught:
        async with conn.transaction():
            await conn.execute(query, *args)
    assert caught.value.sqlstate == sqlstate, f"{query!r}: {caught.value!r}"
    return caught.value


async def call(conn: Conn, query: str, *args: object) -> Any:
    """The jsonb a credit function returns (asyncpg hands jsonb over as text), decoded."""
    value = await conn.fetchval(query, *args)
    assert isinstance(value, str)
    return json.loads(value)


async def provision(conn: Conn, user_id: uuid.UUID, *, grant: int = 100, debit: int = 5) -> None:
    """As the owner: a profile with a grant ('k1') and, if `debit`, a debit ('k2') on it."""
    await conn.execute("select public.credit_provision_profile($1::uuid, 'a@example.com')", user_id)
    await conn.execute(
        "select public.credit_grant($1, $2, 'k1', 'seed', '{}'::jsonb)", user_id, grant
    )
    if debit:
        await conn.execute(
            "select public.credit_debit($1, $2, 'k2', '', '{}'::jsonb)", user_id, debit
        )


@dataclass(frozen=True)
class Snapshot:
    """What a user's money looks like, read as the owner."""

    balance: int
    held: int
    email: str
    ledger: list[tuple[object, ...]]
    holds: list[tuple[object, ...]]
    generations: list[tuple[object, ...]]
    grants: list[tuple[object, ...]]


async def snapshot(conn: Conn, user_id: uuid.UUID) -> Snapshot:
    profile = await conn.fetchrow(
        "select balance, held, email from public.credit_profiles where user_id = $1", user_id
    )
    assert profile is not None

    async def rows(query: str) -> list[tuple[object, ...]]:
        return [tuple(r) for r in await conn.fetch(query, user_id)]

    return Snapshot(
        balance=profile["balance"],
        held=profile["held"],
        email=profile["email"],
        ledger=await rows(
            "select transaction_id, kind, amount, balance_after from public.credit_transactions"
            " where user_id = $1 order by seq"
        ),
        holds=await rows(
            "select hold_id, state, amount from public.credit_holds where user_id = $1"
            " order by hold_id"
        ),
        generations=await rows(
            "select generation_id, state, cost from public.credit_generations where user_id = $1"
            " order by generation_id"
        ),
        grants=await rows(
            "select grant_id, amount, remaining, pinned, voided_at from public.credit_grants"
            " where user_id = $1 order by seq"
        ),
    )


@pytest.fixture
async def owner(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the schema's owner (a superuser, like Supabase's `postgres`)."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def seeded_user(owner: asyncpg.Connection) -> uuid.UUID:
    """A fresh user with balance 95 (grant 100, debit 5), one released hold and one generation.

    The owner inserts the hold and the generation directly (a queued one of cost 0, without a
    hold, that no function would make); the hold is released, so `held` stays 0, and its pin on
    the user's grant is history. The generation is never due, so no worker on the shared queue
    (the server's, or a test's) ever claims it.
    """
    user_id = uuid.uuid4()
    await provision(owner, user_id)
    await owner.execute("select public.credit_set_spend_limit($1, 'week', 1000000)", user_id)
    await owner.execute(
        "with hold as (insert into public.credit_holds (user_id, amount, state, idempotency_key,"
        " fingerprint, expires_at) values ($1, 3, 'released', 'h1', 'fp',"
        " now() + interval '1 hour') returning hold_id)"
        " insert into public.credit_hold_pins (hold_id, grant_id, user_id, ordinal, amount)"
        " select hold.hold_id, g.grant_id, $1, 1, 3 from hold, public.credit_grants g"
        " where g.user_id = $1",
        user_id,
    )
    await owner.execute(
        "insert into public.credit_generations (user_id, model, prompt, cost, request_id,"
        " fingerprint, next_attempt_at) values ($1, 'm', 'p', 0, 'r1', 'fp', 'infinity')",
        user_id,
    )
    return user_id


@pytest.fixture
async def alice(owner: asyncpg.Connection) -> uuid.UUID:
    return await seeded_user(owner)


@pytest.fixture
async def bob(owner: asyncpg.Connection) -> uuid.UUID:
    return await seeded_user(owner)


# Generations need a model in the catalogue and a queue no other session's jobs get into. Both
# live in the shared database: `credit_sync_models` deactivates every model it is not given, and
# the server syncs its own catalogue into this database; `credit_claim_generation` takes the
# oldest runnable job of anyone. So tests of generations run in a transaction that is always
# rolled back, add their model to the active catalogue there, and park the jobs already queued.

TEST_MODEL: dict[str, object] = {
    "model": "test-model",
    "cost": 5,
    "description": "t",
    "timeout_seconds": 30,
    "max_attempts": 2,
}
ACTIVE_MODELS = """
    select coalesce(jsonb_agg(jsonb_build_object(
             'model', model, 'cost', cost, 'description', description,
             'timeout_seconds', timeout_seconds, 'max_attempts', max_attempts) order by model),
           '[]'::jsonb)
      from public.credit_models where active
"""


async def active_models(conn: Conn) -> list[dict[str, object]]:
    """The active catalogue, as `credit_sync_models` takes it, read as the owner."""
    models = json.loads(await conn.fetchval(ACTIVE_MODELS))
    assert isinstance(models, list)
    return models


async def add_test_model(conn: Conn) -> None:
    """In the open (rolled-back) transaction: TEST_MODEL active, every active model kept."""
    assert conn.is_in_transaction(), "the catalogue is shared: change it only in a rollback"
    active = await active_models(conn)
    wanted = sorted(
        [m for m in active if m["model"] != TEST_MODEL["model"]] + [TEST_MODEL],
        key=lambda m: str(m["model"]),
    )
    if wanted != active:
        await conn.execute("select public.credit_sync_models($1::jsonb)", json.dumps(wanted))
    assert await active_models(conn) == wanted


async def park_queue(conn: Conn) -> None:
    """In the open (rolled-back) transaction: no job queued or running so far can be claimed."""
    assert conn.is_in_transaction(), "the queue is shared: park it only in a rollback"
    await conn.execute(
        "update public.credit_generations set next_attempt_at = 'infinity',"
        " lease_expires_at = case when lease_expires_at is not null"
        " then 'infinity'::timestamptz end"
        " where state in ('queued', 'running')"
    )


async def create_generation(conn: Conn, user_id: uuid.UUID, request_id: str) -> uuid.UUID:
    """A queued generation of TEST_MODEL for `user_id`, made by whoever `conn` acts as."""
    created = await call(
        conn,
        "select public.credit_create_generation($1, 'test-model', 'a cat', '{}'::jsonb, $2)",
        user_id,
        request_id,
    )
    assert created["replayed"] is False
    assert (created["generation"]["state"], created["generation"]["cost"]) == ("queued", 5)
    return uuid.UUID(created["generation"]["generation_id"])


async def claim(conn: Conn, worker: str) -> Any:
    """The job `credit_claim_generation` hands `worker` (a lease of a minute), or None."""
    value = await conn.fetchval("select public.credit_claim_generation($1, 60)", worker)
    return None if value is None else json.loads(value)


# 0. The harness acts as each role, with the claims given.

SOMEONE = uuid.UUID("00000000-0000-4000-8000-000000000001")


@pytest.mark.parametrize(
    ("role", "claims", "uid"),
    [
        ("anon", ANON_CLAIMS, None),
        ("authenticated", claims_for(SOMEONE), str(SOMEONE)),
        ("service_role", SERVICE_CLAIMS, None),
    ],
)
async def test_as_role_acts_as_postgrest_does(
    owner: asyncpg.Connection, role: Role, claims: dict[str, str], uid: str | None
) -> None:
    async with as_role(owner, role, claims) as conn:
        row = await conn.fetchrow("select current_user, auth.uid()::text as uid")
    assert row is not None
    assert (row["current_user"], row["uid"]) == (role, uid)
    assert await owner.fetchval("select current_user") != role


# 1. A user's own session reads its own rows and nobody else's.


@pytest.mark.parametrize("table", TABLES)
async def test_user_reads_own_rows_only(
    owner: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID, table: str
) -> None:
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        own = await conn.fetch(f"select user_id from public.{table} where user_id = $1", alice)
        other = await conn.fetch(f"select user_id from public.{table} where user_id = $1", bob)
        everything = await conn.fetch(f"select user_id from public.{table}")
    assert len(own) >= 1
    assert other == []
    assert everything, "the user sees none of its own rows"
    assert {r["user_id"] for r in everything} == {alice}


async def test_user_sees_own_balance(owner: asyncpg.Connection, alice: uuid.UUID) -> None:
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        profile = await conn.fetchrow("select balance, held from public.credit_profiles")
        ledger = await conn.fetch(
            "select kind, amount, balance_after from public.credit_transactions order by seq"
        )
    assert profile is not None
    assert (profile["balance"], profile["held"]) == (95, 0)
    assert [tuple(r) for r in ledger] == [("grant", 100, 100), ("debit", 5, 95)]


async def test_user_sees_own_grants_allocations_and_pins(
    owner: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID
) -> None:
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        grants = await conn.fetch(
            "select user_id, amount, remaining, category, priority, scopes, activated"
            " from public.credit_grants"
        )
        allocations = await conn.fetch(
            "select t.kind, a.amount, a.grant_id = g.grant_id as own_grant"
            " from public.credit_allocations a"
            " join public.credit_transactions t using (transaction_id)"
            " join public.credit_grants g on g.user_id = a.user_id order by t.seq"
        )
        pins = await conn.fetch(
            "select h.idempotency_key, p.amount from public.credit_hold_pins p"
            " join public.credit_holds h using (hold_id)"
        )
        bobs = await conn.fetch(
            "select 1 from public.credit_grants where user_id = $1 union all"
            " select 1 from public.credit_allocations where user_id = $1 union all"
            " select 1 from public.credit_hold_pins where user_id = $1",
            bob,
        )
    assert [tuple(r) for r in grants] == [(alice, 100, 95, "paid", 50, [], True)]
    assert [tuple(r) for r in allocations] == [("grant", 100, True), ("debit", 5, True)]
    assert [tuple(r) for r in pins] == [("h1", 3)]
    assert bobs == []


# 2. A user's session cannot change anything, its own rows or another's.

WRITES_BY_USERS = [
    "update public.credit_profiles set balance = 1000000 where user_id = $1",
    "update public.credit_profiles set held = 0 where user_id = $1",
    "update public.credit_profiles set email = 'evil@example.com' where user_id = $1",
    "insert into public.credit_profiles (user_id, balance) values ($1, 1000000)",
    "delete from public.credit_profiles where user_id = $1",
    "insert into public.credit_transactions (user_id, kind, amount, balance_after, fingerprint)"
    " values ($1, 'grant', 1000000, 1000000, 'fp')",
    "update public.credit_transactions set amount = 1 where user_id = $1",
    "delete from public.credit_transactions where user_id = $1",
    "insert into public.credit_holds (user_id, amount, idempotency_key, fingerprint, expires_at)"
    " values ($1, 1, 'evil', 'fp', now())",
    "update public.credit_holds set state = 'pending' where user_id = $1",
    "delete from public.credit_holds where user_id = $1",
    "insert into public.credit_generations (user_id, model, prompt, cost, request_id, fingerprint)"
    " values ($1, 'm', 'p', 0, 'evil', 'fp')",
    "update public.credit_generations set cost = 0, state = 'succeeded' where user_id = $1",
    "delete from public.credit_generations where user_id = $1",
    "insert into public.credit_grants (user_id, amount, remaining, effective_at, activated,"
    " fingerprint, created_at) values ($1, 1000000, 1000000, now(), true, 'fp', now())",
    "update public.credit_grants set remaining = amount where user_id = $1",
    "update public.credit_grants set expires_at = null, voided_at = null where user_id = $1",
    "delete from public.credit_grants where user_id = $1",
    "insert into public.credit_allocations (transaction_id, grant_id, user_id, ordinal, amount)"
    " select transaction_id, (select grant_id from public.credit_grants where user_id = $1),"
    " user_id, 9, 1 from public.credit_transactions where user_id = $1 limit 1",
    "update public.credit_allocations set amount = amount + 1 where user_id = $1",
    "delete from public.credit_allocations where user_id = $1",
    "insert into public.credit_hold_pins (hold_id, grant_id, user_id, ordinal, amount)"
    " select hold_id, (select grant_id from public.credit_grants where user_id = $1),"
    " user_id, 9, 1 from public.credit_holds where user_id = $1 limit 1",
    "update public.credit_hold_pins set amount = 0 where user_id = $1",
    "delete from public.credit_hold_pins where user_id = $1",
    "insert into public.credit_spend_limits (user_id, day_limit) values ($1, 1)"
    " on conflict (user_id) do update set day_limit = 1",
    "update public.credit_spend_limits set week_limit = null where user_id = $1",
    "delete from public.credit_spend_limits where user_id = $1",
    "insert into public.credit_spend_days (user_id, day, spent) values ($1, '2000-01-01', 0)",
    "update public.credit_spend_days set spent = 0 where user_id = $1",
    "delete from public.credit_spend_days where user_id = $1",
    "insert into public.credit_usage (user_id, day, kind, scope, category, amount, hours)"
    " values ($1, '2000-01-01', 'grant', '', 'paid', 1000000, array_fill(0, array[24]))",
    "update public.credit_usage set amount = 1 where user_id = $1",
    "delete from public.credit_usage where user_id = $1",
]
TRUNCATES = [f"truncate public.{table} cascade" for table in (*TABLES, "credit_models")]


@pytest.mark.parametrize("whose", ["own", "other"])
@pytest.mark.parametrize("statement", WRITES_BY_USERS)
async def test_user_cannot_write(
    owner: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID, statement: str, whose: str
) -> None:
    before = await snapshot(owner, alice)
    acting_as = alice if whose == "own" else bob
    claims = claims_for(acting_as)
    async with rolled_back(owner), as_role(owner, "authenticated", claims) as conn:
        await expect_sqlstate(conn, INSUFFICIENT_PRIVILEGE, statement, alice)
    assert await snapshot(owner, alice) == before


@pytest.mark.parametrize("role", ["anon", "authenticated", "service_role"])
@pytest.mark.parametrize("statement", TRUNCATES)
async def test_api_roles_cannot_truncate(
    owner: asyncpg.Connection, alice: uuid.UUID, statement: str, role: Role
) -> None:
    before = await snapshot(owner, alice)
    claims = {
        "anon": ANON_CLAIMS,
        "authenticated": claims_for(alice),
        "service_role": SERVICE_CLAIMS,
    }
    async with rolled_back(owner), as_role(owner, role, claims[role]) as conn:
        await expect_sqlstate(conn, INSUFFICIENT_PRIVILEGE, statement)
    assert await snapshot(owner, alice) == before


async def test_user_cannot_read_private_settings(
    owner: asyncpg.Connection, alice: uuid.UUID
) -> None:
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        await expect_sqlstate(
            conn, INSUFFICIENT_PRIVILEGE, "select * from credits_private.settings"
        )
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        await expect_sqlstate(
            conn,
            INSUFFICIENT_PRIVILEGE,
            "select credits_private.record($1, 'grant', 1000000, 'evil', 'fp', '', '{}',"
            " null, null)",
            alice,
        )


EVENT_TABLES = (
    "events",
    "balance_alerts",
    "balance_watchers",
    "grant_notices",
    "webhook_endpoints",
    "webhook_deliveries",
    "event_cursor",
)


@pytest.mark.parametrize("role", ["anon", "authenticated", "service_role"])
@pytest.mark.parametrize(
    "statement",
    [
        "select * from credits_private.clock",
        "update credits_private.clock set \"offset\" = interval '1 year'",
        # Events, thresholds, watches, endpoints with their secrets, deliveries (issue 19).
        *(f"select * from credits_private.{table}" for table in EVENT_TABLES),
        *(f"delete from credits_private.{table}" for table in EVENT_TABLES),
    ],
)
async def test_no_api_role_reads_or_writes_the_clock_or_the_events(
    owner: asyncpg.Connection, alice: uuid.UUID, statement: str, role: Role
) -> None:
    claims = {
        "anon": ANON_CLAIMS,
        "authenticated": claims_for(alice),
        "service_role": SERVICE_CLAIMS,
    }
    async with rolled_back(owner), as_role(owner, role, claims[role]) as conn:
        await expect_sqlstate(conn, INSUFFICIENT_PRIVILEGE, statement)
    assert await owner.fetchval('select "offset" from credits_private.clock') == timedelta(0)


# 3. The anonymous role reads nothing and calls nothing.


@pytest.mark.parametrize("table", TABLES)
async def test_anon_cannot_select(owner: asyncpg.Connection, table: str) -> None:
    async with as_role(owner, "anon", ANON_CLAIMS) as conn:
        await expect_sqlstate(conn, INSUFFICIENT_PRIVILEGE, f"select * from public.{table}")


async def credit_functions(conn: Conn) -> list[asyncpg.Record]:
    """Every public.credit_% function, its attributes, and a call of it with typed nulls."""
    return await conn.fetch(
        r"""
        select p.oid, p.proname, p.prosecdef, p.proconfig, p.proacl, p.proowner,
               format('%s(%s)', p.proname, oidvectortypes(p.proargtypes)) as signature,
               format('select public.%I(%s)', p.proname,
                      (select coalesce(string_agg(format('null::%s', format_type(t, null)), ', '
                                                  order by i), '')
                         from unnest(p.proargtypes::oid[]) with ordinality a (t, i))) as call
          from pg_proc p
         where p.pronamespace = 'public'::regnamespace and p.proname like 'credit\_%'
         order by p.proname
        """
    )


async def test_anon_cannot_execute_any_credit_function(owner: asyncpg.Connection) -> None:
    functions = await credit_functions(owner)
    names = {f["proname"] for f in functions}
    assert names >= {
        "credit_configure",
        "credit_provision_profile",
        "credit_get_profile",
        "credit_list_transactions",
        "credit_debit",
        "credit_grant",
    }
    for function in functions:
        async with as_role(owner, "anon", ANON_CLAIMS) as conn:
            await expect_sqlstate(conn, INSUFFICIENT_PRIVILEGE, function["call"])


# 4. A user's session may use the user-facing functions for itself only.


async def test_user_functions_for_itself(owner: asyncpg.Connection, alice: uuid.UUID) -> None:
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        provisioned = await call(conn, "select public.credit_provision_profile($1, 'x')", alice)
        debited = await call(
            conn, "select public.credit_debit($1, 2, 'k-self', 'mine', '{}'::jsonb)", alice
        )
        profile = await call(conn, "select public.credit_get_profile($1)", alice)
        ledger = await call(conn, "select public.credit_list_transactions($1, 10)", alice)
    assert provisioned == {"created": False}
    assert debited["replayed"] is False
    assert debited["balance"] == 93
    assert debited["transaction"]["kind"] == "debit"
    assert (profile["user_id"], profile["balance"], profile["available"]) == (str(alice), 93, 93)
    assert [(t["kind"], t["amount"]) for t in ledger] == [
        ("debit", 2),
        ("debit", 5),
        ("grant", 100),
    ]
    assert (await snapshot(owner, alice)).balance == 93


async def test_user_provisions_itself_with_email_from_its_token(
    owner: asyncpg.Connection,
) -> None:
    carol = uuid.uuid4()
    claims = claims_for(carol, email="carol@example.com")
    async with as_role(owner, "authenticated", claims) as conn:
        created = await call(
            conn, "select public.credit_provision_profile($1, 'spoof@example.com')", carol
        )
    assert created == {"created": True}
    assert (
        await owner.fetchval("select email from public.credit_profiles where user_id = $1", carol)
        == "carol@example.com"
    )


@pytest.mark.parametrize(
    ("query", "sqlstate"),
    [
        ("select public.credit_debit($1, 1, 'k-other', '', '{}'::jsonb)", INSUFFICIENT_PRIVILEGE),
        ("select public.credit_provision_profile($1, 'x')", INSUFFICIENT_PRIVILEGE),
        ("select public.credit_get_profile($1)", PROFILE_NOT_FOUND),
        ("select public.credit_list_transactions($1, 10)", PROFILE_NOT_FOUND),
        ("select public.credit_grant($1, 1000, 'k-evil', '', '{}'::jsonb)", INSUFFICIENT_PRIVILEGE),
    ],
)
async def test_user_functions_for_another_user(
    owner: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID, query: str, sqlstate: str
) -> None:
    before = await snapshot(owner, bob)
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        await expect_sqlstate(conn, sqlstate, query, bob)
    assert await snapshot(owner, bob) == before


async def test_user_cannot_provision_a_stranger(
    owner: asyncpg.Connection, alice: uuid.UUID
) -> None:
    stranger = uuid.uuid4()
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        await expect_sqlstate(
            conn,
            INSUFFICIENT_PRIVILEGE,
            "select public.credit_provision_profile($1, 'x')",
            stranger,
        )
    assert (
        await owner.fetchval(
            "select count(*) from public.credit_profiles where user_id = $1", stranger
        )
        == 0
    )


LISTINGS = ("credit_list_transactions", "credit_list_grants", "credit_list_generations")


@pytest.mark.parametrize("listing", LISTINGS)
@pytest.mark.parametrize("limit", [None, 0, -1, 1001])
async def test_user_listings_refuse_a_page_limit_outside_1_to_1000(
    owner: asyncpg.Connection, alice: uuid.UUID, listing: str, limit: int | None
) -> None:
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        error = await expect_sqlstate(
            conn, INVALID_ARGUMENT, f"select public.{listing}($1, $2::integer)", alice, limit
        )
    assert json.loads(error.detail)["field"] == "page_size"


@pytest.mark.parametrize(
    ("listing", "rows"),
    # `alice`'s rows: a grant and a debit in the ledger, one grant, one generation.
    [("credit_list_transactions", 2), ("credit_list_grants", 1), ("credit_list_generations", 1)],
)
async def test_user_listings_take_a_page_of_1_to_1000(
    owner: asyncpg.Connection, alice: uuid.UUID, listing: str, rows: int
) -> None:
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        most = await call(conn, f"select public.{listing}($1, 1000)", alice)
        one = await call(conn, f"select public.{listing}($1, 1)", alice)
    assert (len(most), len(one)) == (rows, 1)


@pytest.mark.parametrize(
    "query",
    [
        "select public.credit_grant($1, 1000, 'k-self-grant', '', '{}'::jsonb)",
        "select public.credit_configure(1000000)",
    ],
)
async def test_user_cannot_call_service_functions(
    owner: asyncpg.Connection, alice: uuid.UUID, query: str
) -> None:
    before = await snapshot(owner, alice)
    signup = await owner.fetchval("select signup_credits from credits_private.settings")
    args = (alice,) if "$1" in query else ()
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        await expect_sqlstate(conn, INSUFFICIENT_PRIVILEGE, query, *args)
    assert await snapshot(owner, alice) == before
    assert await owner.fetchval("select signup_credits from credits_private.settings") == signup


# 5. The service role reads everyone and moves money only through the functions.


async def test_service_reads_every_user_and_grants(
    owner: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID
) -> None:
    async with as_role(owner, "service_role", SERVICE_CLAIMS) as conn:
        for table in TABLES:
            seen = await conn.fetch(
                f"select distinct user_id from public.{table} where user_id = any($1::uuid[])",
                [alice, bob],
            )
            assert {r["user_id"] for r in seen} == {alice, bob}, table
        granted = await call(
            conn, "select public.credit_grant($1, 10, 'k-service', 'bonus', '{}'::jsonb)", alice
        )
        other = await call(conn, "select public.credit_get_profile($1)", bob)
    assert (granted["replayed"], granted["balance"]) == (False, 105)
    assert other["balance"] == 95
    assert (await snapshot(owner, alice)).balance == 105


WRITES_BY_SERVICE = [
    "update public.credit_profiles set balance = 1000000 where user_id = $1",
    "update public.credit_profiles set held = 0 where user_id = $1",
    "insert into public.credit_profiles (user_id) values ($1)",
    "delete from public.credit_profiles where user_id = $1",
    "insert into public.credit_transactions (user_id, kind, amount, balance_after, fingerprint)"
    " values ($1, 'grant', 1000000, 1000000, 'fp')",
    "update public.credit_transactions set amount = 1 where user_id = $1",
    "delete from public.credit_transactions where user_id = $1",
    "update public.credit_holds set state = 'pending' where user_id = $1",
    "update public.credit_generations set cost = 0 where user_id = $1",
    "update public.credit_generations set state = 'queued', lease_owner = 'evil',"
    " next_attempt_at = now() where user_id = $1",
    "insert into public.credit_grants (user_id, amount, remaining, effective_at, activated,"
    " fingerprint, created_at) values ($1, 1000000, 1000000, now(), true, 'fp', now())",
    "update public.credit_grants set remaining = amount where user_id = $1",
    "delete from public.credit_grants where user_id = $1",
    "update public.credit_allocations set amount = amount + 1 where user_id = $1",
    "delete from public.credit_allocations where user_id = $1",
    "update public.credit_hold_pins set amount = 0 where user_id = $1",
    "delete from public.credit_hold_pins where user_id = $1",
    "insert into public.credit_spend_limits (user_id, day_limit) values ($1, 1)"
    " on conflict (user_id) do update set day_limit = 1",
    "update public.credit_spend_limits set week_limit = null where user_id = $1",
    "delete from public.credit_spend_limits where user_id = $1",
    "insert into public.credit_spend_days (user_id, day, spent) values ($1, '2000-01-01', 0)",
    "update public.credit_spend_days set spent = 0 where user_id = $1",
    "delete from public.credit_spend_days where user_id = $1",
    "insert into public.credit_usage (user_id, day, kind, scope, category, amount, hours)"
    " values ($1, '2000-01-01', 'grant', '', 'paid', 1000000, array_fill(0, array[24]))",
    "update public.credit_usage set amount = 1 where user_id = $1",
    "delete from public.credit_usage where user_id = $1",
]


@pytest.mark.parametrize("statement", WRITES_BY_SERVICE)
async def test_service_cannot_write_tables(
    owner: asyncpg.Connection, alice: uuid.UUID, statement: str
) -> None:
    before = await snapshot(owner, alice)
    async with rolled_back(owner), as_role(owner, "service_role", SERVICE_CLAIMS) as conn:
        await expect_sqlstate(conn, INSUFFICIENT_PRIVILEGE, statement, alice)
    assert await snapshot(owner, alice) == before


# 6. The ledger is append-only, for the owner too.


@pytest.mark.parametrize(
    "statement",
    [
        "update public.credit_transactions set amount = amount + 1000 where user_id = $1",
        "update public.credit_transactions set description = 'edited' where user_id = $1",
        "delete from public.credit_transactions where user_id = $1",
        "truncate public.credit_transactions cascade",
    ],
)
async def test_owner_cannot_rewrite_the_ledger(
    owner: asyncpg.Connection, alice: uuid.UUID, statement: str
) -> None:
    before = await snapshot(owner, alice)
    args = (alice,) if "$1" in statement else ()
    async with rolled_back(owner):
        error = await expect_sqlstate(owner, INSUFFICIENT_PRIVILEGE, statement, *args)
    assert error.message == "the credit ledger is append-only"
    assert await snapshot(owner, alice) == before


async def test_owner_plain_truncate_of_the_ledger_fails(
    owner: asyncpg.Connection, alice: uuid.UUID
) -> None:
    # Without CASCADE the foreign keys of credit_generations refuse it before the trigger fires.
    before = await snapshot(owner, alice)
    async with rolled_back(owner):
        await expect_sqlstate(owner, "0A000", "truncate public.credit_transactions")
    assert await snapshot(owner, alice) == before


# 7. Check constraints hold the balance in bounds, for the owner too.


@pytest.mark.parametrize(
    "assignment", ["balance = -1", "held = balance + 1", "held = -1", "balance = held - 1"]
)
async def test_owner_cannot_break_balance_bounds(
    owner: asyncpg.Connection, alice: uuid.UUID, assignment: str
) -> None:
    async with rolled_back(owner):
        await expect_sqlstate(
            owner,
            CHECK_VIOLATION,
            f"update public.credit_profiles set {assignment} where user_id = $1",
            alice,
        )
    assert (await snapshot(owner, alice)).balance == 95


# 8. Catalog-wide rules, so a new table or function cannot quietly skip them.


async def test_every_public_table_has_row_level_security(owner: asyncpg.Connection) -> None:
    tables = await owner.fetch(
        "select relname, relrowsecurity from pg_class"
        " where relnamespace = 'public'::regnamespace and relkind in ('r', 'p')"
    )
    assert {t["relname"] for t in tables} >= set(TABLES)
    assert [t["relname"] for t in tables if not t["relrowsecurity"]] == []


async def test_security_definer_functions_pin_search_path(owner: asyncpg.Connection) -> None:
    functions = await credit_functions(owner)
    definers = [f for f in functions if f["prosecdef"]]
    assert {f["proname"] for f in definers} >= {"credit_debit", "credit_grant"}
    unpinned = [f["proname"] for f in definers if 'search_path=""' not in (f["proconfig"] or [])]
    assert unpinned == []


async def test_no_credit_function_is_executable_by_public_or_anon(
    owner: asyncpg.Connection,
) -> None:
    rows = await owner.fetch(
        r"""
        select p.proname,
               has_function_privilege('anon', p.oid, 'execute') as anon,
               exists (select 1 from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                        where a.grantee = 0 and a.privilege_type = 'EXECUTE') as public
          from pg_proc p
         where p.pronamespace in ('public'::regnamespace, 'credits_private'::regnamespace)
           and (p.proname like 'credit\_%' or p.pronamespace = 'credits_private'::regnamespace)
        """
    )
    assert rows
    assert [r["proname"] for r in rows if r["anon"] or r["public"]] == []


# 9. The balance is the ledger's sum, for every profile.


async def test_balance_equals_ledger_sum_for_every_profile(
    owner: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID
) -> None:
    await owner.execute("select public.credit_debit($1, 7, 'k3', 'more', '{}'::jsonb)", alice)
    await owner.execute("select public.credit_grant($1, 11, 'k3', 'more', '{}'::jsonb)", bob)
    mismatches = await owner.fetch(
        """
        select p.user_id, p.balance, coalesce(l.total, 0) as ledger
          from public.credit_profiles p
          left join (
            select user_id,
                   sum(case when kind in ('grant', 'refund') then amount else -amount end) as total
              from public.credit_transactions group by user_id
          ) l using (user_id)
         where p.balance <> coalesce(l.total, 0)
        """
    )
    assert [tuple(m) for m in mismatches] == []
    assert await owner.fetchval(LEDGER_SUM, alice) == 88
    assert await owner.fetchval(LEDGER_SUM, bob) == 106


# 10. Idempotency keys: a replay returns the first result, a different request is refused.


async def test_same_key_same_request_replays(owner: asyncpg.Connection, alice: uuid.UUID) -> None:
    before = await snapshot(owner, alice)
    first_debit = before.ledger[1][0]
    debit = await call(owner, "select public.credit_debit($1, 5, 'k2', '', '{}'::jsonb)", alice)
    grant = await call(
        owner, "select public.credit_grant($1, 100, 'k1', 'seed', '{}'::jsonb)", alice
    )
    assert (debit["replayed"], debit["balance"]) == (True, 95)
    assert debit["transaction"]["transaction_id"] == str(first_debit)
    assert (grant["replayed"], grant["balance"]) == (True, 100)
    assert await snapshot(owner, alice) == before


@pytest.mark.parametrize(
    "query",
    [
        "select public.credit_debit($1, 6, 'k2', '', '{}'::jsonb)",
        "select public.credit_debit($1, 5, 'k2', 'changed', '{}'::jsonb)",
        """select public.credit_debit($1, 5, 'k2', '', '{"a": 1}'::jsonb)""",
        "select public.credit_grant($1, 101, 'k1', 'seed', '{}'::jsonb)",
        "select public.credit_debit($1, 100, 'k1', 'seed', '{}'::jsonb)",
        "select public.credit_debit($1, 3, 'h1', '', '{}'::jsonb)",
    ],
)
async def test_same_key_different_request_is_refused(
    owner: asyncpg.Connection, alice: uuid.UUID, query: str
) -> None:
    before = await snapshot(owner, alice)
    await expect_sqlstate(owner, KEY_REUSED, query, alice)
    assert await snapshot(owner, alice) == before


# 11. Concurrent debits never overdraw.


async def test_concurrent_debits_never_overdraw(
    owner: asyncpg.Connection, database_url: str
) -> None:
    user_id = uuid.uuid4()
    await provision(owner, user_id, grant=20, debit=0)

    async def debit(pool: asyncpg.Pool, i: int) -> Any:
        async with (
            pool.acquire() as conn,
            as_role(conn, "authenticated", claims_for(user_id)) as acting,
        ):
            return await call(
                acting,
                "select public.credit_debit($1, 1, $2, '', '{}'::jsonb)",
                user_id,
                f"key-{i}",
            )

    async with asyncpg.create_pool(database_url, min_size=10, max_size=10) as pool:
        results = await asyncio.gather(*(debit(pool, i) for i in range(50)), return_exceptions=True)

    succeeded = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, asyncpg.PostgresError)]
    assert len(succeeded) + len(refused) == 50, [r for r in results if not isinstance(r, dict)]
    assert len(succeeded) == 20
    assert sorted(r["balance"] for r in succeeded) == list(range(20))
    assert {r.sqlstate for r in refused} == {INSUFFICIENT_CREDITS}
    assert all(
        json.loads(r.detail or "null") == {"required": 1, "available": 0, "scope": ""}
        for r in refused
    )
    final = await snapshot(owner, user_id)
    assert (final.balance, final.held) == (0, 0)
    assert await owner.fetchval(LEDGER_SUM, user_id) == 0
    assert [row[1] for row in final.ledger].count("debit") == 20


# 11b. A generation keeps the trace context it was created in (docs/tracing.md): a well-formed
# traceparent only, and only for the generation of the call that passed it.

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_a_generation_keeps_only_a_well_formed_traceparent_of_its_own_call(
    owner: asyncpg.Connection, alice: uuid.UUID
) -> None:
    traced = (
        "select public.credit_create_generation_traced("
        "$1, 'test-model', 'a cat', '{}'::jsonb, $2, $3)"
    )
    kept = []
    async with rolled_back(owner):
        await add_test_model(owner)
        async with as_role(owner, "service_role", SERVICE_CLAIMS) as conn:
            for key, traceparent in (
                ("traced", TRACEPARENT),
                ("plain", None),  # the same transaction: the one before does not leak into it
                ("malformed", "00-not-a-trace"),
            ):
                if key == "plain":
                    generation = await create_generation(conn, alice, key)
                else:
                    created = await call(conn, traced, alice, key, traceparent)
                    generation = uuid.UUID(created["generation"]["generation_id"])
                kept.append(
                    await conn.fetchval(
                        "select public.credit_generation_traceparent($1)", generation
                    )
                )
    assert kept == [TRACEPARENT, None, None]


# 12. Every credit function, for every role: exactly the allowed calls succeed.
#
# The target is always alice, who has a pending hold of 10 besides her seeded money. "own" acts
# with alice's claims, "other" with bob's. Arguments are named: alice, bob (their ids), hold
# (alice's pending hold), debit (alice's debit 'k2'), signup (the current signup credits, so
# that a permitted credit_configure changes nothing the other tests see), models (the active
# catalogue, so that a permitted credit_sync_models changes nothing either) and generation
# (alice's job, for the entries that give her one: a generation of TEST_MODEL, cost 5, queued
# or claimed by 'matrix-worker', with its pending hold). Every call runs in a transaction that
# is rolled back, with TEST_MODEL in the catalogue and the shared queue parked.

Actor: TypeAlias = Literal["anon", "own", "other", "service"]
ACTORS: tuple[Actor, ...] = ("anon", "own", "other", "service")
OK = "00000"  # successful_completion
DENIED = INSUFFICIENT_PRIVILEGE


def session(actor: Actor, alice: uuid.UUID, bob: uuid.UUID) -> tuple[Role, dict[str, str]]:
    """The role and JWT claims `actor` acts with."""
    sessions: dict[Actor, tuple[Role, dict[str, str]]] = {
        "anon": ("anon", ANON_CLAIMS),
        "own": ("authenticated", claims_for(alice)),
        "other": ("authenticated", claims_for(bob)),
        "service": ("service_role", SERVICE_CLAIMS),
    }
    return sessions[actor]


@dataclass(frozen=True)
class Effect:
    """What a permitted call does to alice's money, and (a part of) what it returns."""

    returns: object = None
    balance: int = 0
    held: int = 0
    ledger: tuple[tuple[str, int], ...] = ()
    holds: tuple[str, ...] = ("pending", "released")
    # alice's generations after the call as sorted (state, cost) pairs; None: left unchanged.
    generations: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True)
class Entry:
    """A call of one credit function, and its outcome (a SQLSTATE, or OK) for each actor."""

    function: str  # name(argument types), as pg_proc spells them
    call: str
    args: tuple[str, ...]
    outcomes: Mapping[Actor, str]
    effect: Effect = Effect()
    variant: str = ""
    overdue: bool = False  # alice's pending hold is past its expiry before the call
    job: Literal["", "queued", "running"] = ""  # alice's job before the call, if she has one


def outcomes(own: str, other: str, service: str, anon: str = DENIED) -> dict[Actor, str]:
    return {"anon": anon, "own": own, "other": other, "service": service}


SERVICE_ONLY = outcomes(own=DENIED, other=DENIED, service=OK)
USER_WRITE = outcomes(own=OK, other=DENIED, service=OK)
USER_READ = outcomes(own=OK, other=PROFILE_NOT_FOUND, service=OK)
CAPTURED = Effect(
    returns={"balance": 85, "hold": {"state": "captured", "amount": 10}},
    balance=-10,
    held=-10,
    ledger=(("capture", 10),),
    holds=("captured", "released"),
)
RELEASED = Effect(
    returns={"available": 95, "hold": {"state": "released", "amount": 10}},
    held=-10,
    holds=("released", "released"),
)

# How p_owner is passed to capture and release: null, the hold owner's id, or bob's id. Under a
# user session the functions check auth.uid() whatever p_owner says, and another user's hold is
# CR004 exactly like an unknown one; a service acting for bob does not find alice's hold either.
P_OWNERS: list[tuple[str, tuple[str, ...], dict[Actor, str]]] = [
    ("null", (), outcomes(own=OK, other=HOLD_NOT_FOUND, service=OK)),
    ("alice", ("alice",), outcomes(own=OK, other=HOLD_NOT_FOUND, service=OK)),
    ("bob", ("bob",), outcomes(own=HOLD_NOT_FOUND, other=HOLD_NOT_FOUND, service=HOLD_NOT_FOUND)),
]


def hold_entries(function: str, call: str, effect: Effect) -> list[Entry]:
    """`call` of a hold function, `{owner}` standing for p_owner, for each way of passing it."""
    return [
        Entry(
            function,
            call.format(owner="$2" if owner else "null"),
            ("hold", *owner),
            expected,
            effect,
            variant=f"p_owner={name}",
        )
        for name, owner, expected in P_OWNERS
    ]


def generation_entries(function: str, call: str, effect: Effect) -> list[Entry]:
    """`call` on alice's queued job, `{owner}` standing for p_owner, for each way of passing it.

    The same rules as for holds: another user's generation is CR009 exactly like an unknown one.
    """
    not_found = {HOLD_NOT_FOUND: GENERATION_NOT_FOUND}
    return [
        Entry(
            function,
            call.format(owner="$2" if owner else "null"),
            ("generation", *owner),
            {actor: not_found.get(outcome, outcome) for actor, outcome in expected.items()},
            effect,
            variant=f"p_owner={name}",
            job="queued",
        )
        for name, owner, expected in P_OWNERS
    ]


# alice's money and generations with her job: besides the pending hold of 10, the job's own of 5.
WITH_JOB = ("pending", "pending", "released")
QUEUED_JOB = (("queued", 0), ("queued", 5))
RUNNING_JOB = (("queued", 0), ("running", 5))


FUNCTION_MATRIX = [
    Entry(
        "credit_configure(bigint, bigint)",
        "select public.credit_configure($1, $2)",
        ("signup", "signup_ttl"),
        SERVICE_ONLY,
    ),
    Entry(
        "credit_provision_profile(uuid, text)",
        "select public.credit_provision_profile($1, 'x')",
        ("alice",),
        USER_WRITE,
        Effect(returns={"created": False}),
    ),
    # alice is not in auth.users: a service provisions only users the identity provider knows.
    Entry(
        "credit_provision_known_user(uuid)",
        "select public.credit_provision_known_user($1)",
        ("alice",),
        outcomes(own=DENIED, other=DENIED, service=PROFILE_NOT_FOUND),
    ),
    Entry(
        "credit_get_profile(uuid)",
        "select public.credit_get_profile($1)",
        ("alice",),
        USER_READ,
        Effect(
            returns={
                "balance": 95,
                "held": 10,
                "available": 85,
                "next_expire_time": None,
                "next_expire_amount": 0,
            }
        ),
    ),
    Entry(
        "credit_check(uuid, bigint, text)",
        "select public.credit_check($1, 90, '')",
        ("alice",),
        USER_READ,
        Effect(returns={"sufficient": False, "available": 85, "shortfall": 5}),
    ),
    Entry(
        "credit_list_grants(uuid, integer, bigint, text[])",
        "select public.credit_list_grants($1, 10, null, array['active'])",
        ("alice",),
        USER_READ,
        Effect(returns=[{"amount": 100, "remaining": 95, "state": "active", "priority": 50}]),
    ),
    Entry(
        "credit_list_transactions(uuid, integer, bigint, text[], timestamp with time zone,"
        " timestamp with time zone)",
        "select public.credit_list_transactions($1, 10, null, array['debit'],"
        " now() - interval '1 hour', now() + interval '1 hour')",
        ("alice",),
        USER_READ,
        Effect(returns=[{"kind": "debit", "amount": 5}]),
    ),
    Entry(
        "credit_debit(uuid, bigint, text, text, jsonb, text)",
        "select public.credit_debit($1, 1, 'matrix-debit', '', '{}'::jsonb)",
        ("alice",),
        USER_WRITE,
        Effect(returns={"balance": 94, "replayed": False}, balance=-1, ledger=(("debit", 1),)),
    ),
    # A scope: alice's grant is unscoped, so it pays for any scope.
    Entry(
        "credit_debit(uuid, bigint, text, text, jsonb, text)",
        "select public.credit_debit($1, 1, 'matrix-debit', '', '{}'::jsonb, 'some-model')",
        ("alice",),
        USER_WRITE,
        Effect(returns={"balance": 94, "replayed": False}, balance=-1, ledger=(("debit", 1),)),
        variant="scoped",
    ),
    Entry(
        "credit_debit_each(uuid[], bigint[], text[], text[], jsonb[], text[])",
        "select public.credit_debit_each(array[$1::uuid], array[1::bigint], array['matrix-debit'],"
        " array[''], array['{}'::jsonb], array['some-model'])",
        ("alice",),
        SERVICE_ONLY,
        Effect(
            returns={"ordinal": 1, "result": {"balance": 94}, "error_code": None},
            balance=-1,
            ledger=(("debit", 1),),
        ),
    ),
    Entry(
        "credit_get_profile_each(uuid[])",
        "select public.credit_get_profile_each(array[$1::uuid])",
        ("alice",),
        SERVICE_ONLY,
        Effect(returns={"ordinal": 1, "result": {"available": 85}, "error_code": None}),
    ),
    Entry(
        GRANT_SIGNATURE,
        "select public.credit_grant($1, 7, 'matrix-grant', '', '{}'::jsonb)",
        ("alice",),
        SERVICE_ONLY,
        Effect(
            returns={"balance": 102, "replayed": False, "grant": {"amount": 7, "state": "active"}},
            balance=7,
            ledger=(("grant", 7),),
        ),
    ),
    # Taking effect in an hour: pending, counted nowhere, no ledger entry yet.
    Entry(
        GRANT_SIGNATURE,
        "select public.credit_grant($1, 7, 'matrix-grant', '', '{}'::jsonb,"
        " now() + interval '1 day', now() + interval '1 hour', 10, 'promotional',"
        " array['some-model'])",
        ("alice",),
        SERVICE_ONLY,
        Effect(
            returns={
                "balance": 95,
                "transaction": None,
                "grant": {"state": "pending", "category": "promotional", "scopes": ["some-model"]},
            }
        ),
        variant="pending",
    ),
    # Past the largest bigint balance: refused before the ledger entry, nothing written.
    Entry(
        GRANT_SIGNATURE,
        "select public.credit_grant($1, 9223372036854775807, 'matrix-grant', '', '{}'::jsonb)",
        ("alice",),
        outcomes(own=DENIED, other=DENIED, service=BALANCE_LIMIT_EXCEEDED),
        variant="past-the-ceiling",
    ),
    # Voids alice's grant: its unpinned 85 leave now; the 10 her pending hold pins stay.
    Entry(
        "credit_void_grant(uuid, text, text, uuid)",
        "select public.credit_void_grant($1, 'matrix-void', 'refund')",
        ("grant",),
        SERVICE_ONLY,
        Effect(
            returns={"balance": 10, "grant": {"state": "voided", "remaining": 10}},
            balance=-85,
            ledger=(("void", 85),),
        ),
    ),
    # A user given must own the grant: another's is not found.
    Entry(
        "credit_void_grant(uuid, text, text, uuid)",
        "select public.credit_void_grant($1, 'matrix-void', 'refund', $2)",
        ("grant", "bob"),
        outcomes(own=DENIED, other=DENIED, service=GRANT_NOT_FOUND),
        variant="p_user_id=bob",
    ),
    Entry(
        "credit_reserve(uuid, bigint, text, integer, text, text)",
        "select public.credit_reserve($1, 3, 'matrix-reserve', 60, 'job')",
        ("alice",),
        USER_WRITE,
        Effect(
            returns={"available": 82, "replayed": False, "hold": {"state": "pending", "amount": 3}},
            held=3,
            holds=("pending", "pending", "released"),
        ),
    ),
    *hold_entries(
        "credit_capture(uuid, uuid, bigint, text)",
        "select public.credit_capture($1, {owner}, 0, 'matrix-capture')",
        CAPTURED,
    ),
    *hold_entries(
        "credit_release(uuid, uuid)", "select public.credit_release($1, {owner})", RELEASED
    ),
    Entry(
        "credit_refund(uuid, uuid, bigint, text, text)",
        "select public.credit_refund($1, $2, 2, 'matrix-refund', 'oops')",
        ("alice", "debit"),
        SERVICE_ONLY,
        Effect(returns={"balance": 97, "replayed": False}, balance=2, ledger=(("refund", 2),)),
    ),
    # No user given: the refund is the transaction's owner's.
    Entry(
        "credit_refund(uuid, uuid, bigint, text, text)",
        "select public.credit_refund(null, $1, 2, 'matrix-refund', 'oops')",
        ("debit",),
        SERVICE_ONLY,
        Effect(returns={"balance": 97, "replayed": False}, balance=2, ledger=(("refund", 2),)),
        variant="p_user_id=null",
    ),
    # A user given must own the transaction: another's is not found.
    Entry(
        "credit_refund(uuid, uuid, bigint, text, text)",
        "select public.credit_refund($1, $2, 2, 'matrix-refund', 'oops')",
        ("bob", "debit"),
        outcomes(own=DENIED, other=DENIED, service=TRANSACTION_NOT_FOUND),
        variant="p_user_id=bob",
    ),
    Entry(
        "credit_expire_holds(integer)",
        "select public.credit_expire_holds(1000000)",
        (),
        SERVICE_ONLY,
        Effect(held=-10, holds=("expired", "released")),
        overdue=True,
    ),
    Entry("credit_queue_stats()", "select public.credit_queue_stats()", (), SERVICE_ONLY),
    Entry("credit_settlement_lag()", "select public.credit_settlement_lag()", (), SERVICE_ONLY),
    Entry("credit_schema_version()", "select public.credit_schema_version()", (), SERVICE_ONLY),
    Entry("credit_schema_versions()", "select public.credit_schema_versions()", (), SERVICE_ONLY),
    Entry(
        "credit_sync_models(jsonb)",
        "select public.credit_sync_models($1::jsonb)",
        ("models",),
        SERVICE_ONLY,
    ),
    Entry(
        "credit_create_generation(uuid, text, text, jsonb, text)",
        "select public.credit_create_generation($1, 'test-model', 'a cat', '{\"n\": 1}'::jsonb,"
        " 'matrix-create')",
        ("alice",),
        USER_WRITE,
        Effect(
            returns={
                "replayed": False,
                "generation": {"model": "test-model", "state": "queued", "cost": 5, "attempts": 0},
            },
            held=5,
            holds=WITH_JOB,
            generations=QUEUED_JOB,
        ),
    ),
    # The same, keeping a trace context with the job (a traced service's CreateGeneration).
    Entry(
        "credit_create_generation_traced(uuid, text, text, jsonb, text, text)",
        "select public.credit_create_generation_traced($1, 'test-model', 'a cat',"
        " '{\"n\": 1}'::jsonb, 'matrix-create',"
        " '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')",
        ("alice",),
        USER_WRITE,
        Effect(
            returns={
                "replayed": False,
                "generation": {"model": "test-model", "state": "queued", "cost": 5, "attempts": 0},
            },
            held=5,
            holds=WITH_JOB,
            generations=QUEUED_JOB,
        ),
    ),
    # The trace context a worker's attempt joins: alice's job was made without one.
    Entry(
        "credit_generation_traceparent(uuid)",
        "select public.credit_generation_traceparent($1)",
        ("generation",),
        SERVICE_ONLY,
        Effect(holds=WITH_JOB),
        job="queued",
    ),
    *generation_entries(
        "credit_get_generation(uuid, uuid)",
        "select public.credit_get_generation($1, {owner})",
        Effect(
            returns={"model": "test-model", "state": "queued", "cost": 5, "output": None},
            holds=WITH_JOB,
        ),
    ),
    Entry(
        "credit_list_generations(uuid, integer, bigint)",
        "select public.credit_list_generations($1, 10)",
        ("alice",),
        USER_READ,
        Effect(
            returns=[
                {"model": "test-model", "state": "queued", "cost": 5, "output": None},
                {"model": "m", "state": "queued", "cost": 0, "output": None},
            ],
            holds=WITH_JOB,
        ),
        job="queued",
    ),
    *generation_entries(
        "credit_cancel_generation(uuid, uuid)",
        "select public.credit_cancel_generation($1, {owner})",
        Effect(
            returns={"state": "cancelled", "cost": 5},
            held=-5,
            holds=("pending", "released", "released"),
            generations=(("cancelled", 5), ("queued", 0)),
        ),
    ),
    Entry(
        "credit_claim_generation(text, integer)",
        "select public.credit_claim_generation('matrix-worker', 60)",
        (),
        SERVICE_ONLY,
        Effect(
            returns={"model": "test-model", "prompt": "a cat", "attempt": 1},
            holds=WITH_JOB,
            generations=RUNNING_JOB,
        ),
        job="queued",
    ),
    Entry(
        "credit_claim_generations(text[], integer)",
        "select public.credit_claim_generations(array['matrix-worker'], 60)",
        (),
        SERVICE_ONLY,
        Effect(
            returns=[
                {"model": "test-model", "prompt": "a cat", "attempt": 1, "worker": "matrix-worker"}
            ],
            holds=WITH_JOB,
            generations=RUNNING_JOB,
        ),
        job="queued",
    ),
    Entry(
        "credit_renew_generation_lease(uuid, text, integer)",
        "select public.credit_renew_generation_lease($1, 'matrix-worker', 60)",
        ("generation",),
        SERVICE_ONLY,
        Effect(returns=True, holds=WITH_JOB),
        job="running",
    ),
    Entry(
        "credit_complete_generation(uuid, text, text, text)",
        "select public.credit_complete_generation($1, 'matrix-worker', 'aGk=', 'text/plain')",
        ("generation",),
        SERVICE_ONLY,
        Effect(
            returns={"charged": True, "generation": {"state": "succeeded", "cost": 5}},
            balance=-5,
            held=-5,
            ledger=(("capture", 5),),
            holds=("captured", "pending", "released"),
            generations=(("queued", 0), ("succeeded", 5)),
        ),
        job="running",
    ),
    Entry(
        "credit_complete_generations(jsonb)",
        "select public.credit_complete_generations(jsonb_build_array(jsonb_build_object("
        "'generation_id', $1::uuid, 'worker', 'matrix-worker', 'output', 'aGk=',"
        " 'output_mime_type', 'text/plain')))",
        ("generation",),
        SERVICE_ONLY,
        Effect(
            returns=[{"charged": True}],
            balance=-5,
            held=-5,
            ledger=(("capture", 5),),
            holds=("captured", "pending", "released"),
            generations=(("queued", 0), ("succeeded", 5)),
        ),
        job="running",
    ),
    Entry(
        "credit_fail_generation(uuid, text, text, boolean, integer)",
        "select public.credit_fail_generation($1, 'matrix-worker', 'boom', false, 0)",
        ("generation",),
        SERVICE_ONLY,
        Effect(
            returns={"state": "failed", "error_message": "boom", "cost": 5},
            held=-5,
            holds=("pending", "released", "released"),
            generations=(("failed", 5), ("queued", 0)),
        ),
        job="running",
    ),
    # Spend controls (issue 20). alice has a weekly limit of her own; her debit of 5 and her
    # pending hold of 10 count (the seeded released hold of 3 never did).
    Entry(
        "credit_configure_limits(bigint, bigint, integer)",
        "select public.credit_configure_limits(null, null, 8)",
        (),
        SERVICE_ONLY,
    ),
    Entry(
        "credit_set_spend_limit(uuid, text, bigint)",
        "select public.credit_set_spend_limit($1, 'day', 50)",
        ("alice",),
        SERVICE_ONLY,
        Effect(
            returns={
                "limits": [
                    {"period": "day", "limit": 50, "spent": 15, "default": False},
                    {"period": "week", "limit": 1000000, "default": False},
                ]
            }
        ),
    ),
    Entry(
        "credit_get_spend_limits(uuid)",
        "select public.credit_get_spend_limits($1)",
        ("alice",),
        USER_WRITE,
        Effect(returns={"limits": [{"period": "week", "limit": 1000000, "default": False}]}),
    ),
    Entry(
        "credit_get_usage(uuid, timestamp with time zone, timestamp with time zone, text, text)",
        "select public.credit_get_usage($1, now() - interval '1 day', now() + interval '1 day',"
        " 'hour', 'kind')",
        ("alice",),
        USER_WRITE,
    ),
    Entry(
        "credit_export_transactions(uuid, timestamp with time zone, timestamp with time zone,"
        " uuid, bigint, integer)",
        "select public.credit_export_transactions($1, null, null, null, null, 10)",
        ("alice",),
        SERVICE_ONLY,
        Effect(returns=[{"kind": "grant", "amount": 100}, {"kind": "debit", "amount": 5}]),
    ),
]


# Events (issue 19): the service's own, but for the reads a user makes for itself.
EVENT_ENTRIES = [
    Entry(
        "credit_configure_events(bigint[], bigint)",
        "select public.credit_configure_events('{}', 259200)",
        (),
        SERVICE_ONLY,
    ),
    Entry(
        "credit_get_profile_alerts(uuid)",
        "select public.credit_get_profile_alerts($1)",
        ("alice",),
        outcomes(own=OK, other=DENIED, service=OK),
        Effect(
            returns={
                "balance": 95,
                "available": 85,
                "low_balance_thresholds": [],
                "low_balance_thresholds_default": True,
            }
        ),
    ),
    Entry(
        "credit_set_balance_alerts(uuid, bigint[])",
        "select public.credit_set_balance_alerts($1, array[20, 90]::bigint[])",
        ("alice",),
        SERVICE_ONLY,
        Effect(returns={"available": 85, "low_balance_thresholds": [20, 90]}),
    ),
    Entry(
        "credit_watch_balance(uuid, integer)",
        "select public.credit_watch_balance($1, 60)",
        ("alice",),
        outcomes(own=OK, other=DENIED, service=OK),
        Effect(returns={"balance": 95, "held": 10, "available": 85}),
    ),
    Entry(
        "credit_list_events(uuid, text[], integer)",
        "select public.credit_list_events(null, array['balance.low'], 1)",
        (),
        SERVICE_ONLY,
    ),
    Entry(
        "credit_notice_expiring_grants(integer)",
        "select public.credit_notice_expiring_grants(1)",
        (),
        SERVICE_ONLY,
    ),
    Entry(
        "credit_add_webhook(text, text[], text)",
        "select public.credit_add_webhook('https://example.com/hook', '{}',"
        " 'whsec_MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIz')",
        (),
        SERVICE_ONLY,
        Effect(returns={"url": "https://example.com/hook", "event_types": []}),
    ),
    Entry("credit_list_webhooks()", "select public.credit_list_webhooks()", (), SERVICE_ONLY),
    Entry(
        "credit_remove_webhook(uuid)",
        "select public.credit_remove_webhook(gen_random_uuid())",
        (),
        outcomes(own=DENIED, other=DENIED, service=INVALID_ARGUMENT),
    ),
    Entry(
        "credit_rotate_webhook_secret(uuid, text)",
        "select public.credit_rotate_webhook_secret(gen_random_uuid(),"
        " 'whsec_MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIz')",
        (),
        outcomes(own=DENIED, other=DENIED, service=INVALID_ARGUMENT),
    ),
    Entry(
        "credit_dispatch_events(integer)",
        "select public.credit_dispatch_events(1)",
        (),
        SERVICE_ONLY,
    ),
    Entry(
        "credit_claim_deliveries(text, integer, integer)",
        "select public.credit_claim_deliveries('matrix-worker', 1, 1)",
        (),
        SERVICE_ONLY,
    ),
    Entry(
        "credit_finish_delivery(uuid, text, boolean, integer, text, double precision)",
        "select public.credit_finish_delivery(gen_random_uuid(), 'matrix-worker', true, 200, '',"
        " null)",
        (),
        SERVICE_ONLY,
        Effect(returns=None),
    ),
    Entry(
        "credit_list_deliveries(text, integer)",
        "select public.credit_list_deliveries('failed', 1)",
        (),
        SERVICE_ONLY,
    ),
    Entry(
        "credit_retry_delivery(uuid)",
        "select public.credit_retry_delivery(gen_random_uuid())",
        (),
        outcomes(own=DENIED, other=DENIED, service=INVALID_ARGUMENT),
    ),
    Entry("credit_delivery_stats()", "select public.credit_delivery_stats()", (), SERVICE_ONLY),
]
FUNCTION_MATRIX += EVENT_ENTRIES


@dataclass(frozen=True)
class Target:
    """Alice's money as the matrix finds it: her pending hold of 10 (pinned on her grant), her
    debit 'k2' and her grant 'k1'."""

    hold: uuid.UUID
    debit: uuid.UUID
    grant: uuid.UUID


@pytest.fixture
async def target(owner: asyncpg.Connection, alice: uuid.UUID) -> Target:
    reserved = await call(
        owner, "select public.credit_reserve($1, 10, 'pending-hold', 3600, 'job')", alice
    )
    debit = await owner.fetchval(
        "select transaction_id from public.credit_transactions"
        " where user_id = $1 and idempotency_key = 'k2'",
        alice,
    )
    grant = await owner.fetchval(
        "select grant_id from public.credit_grants where user_id = $1 and idempotency_key = 'k1'",
        alice,
    )
    return Target(hold=uuid.UUID(reserved["hold"]["hold_id"]), debit=debit, grant=grant)


def matches(actual: object, expected: object) -> bool:
    """Whether `actual` has `expected`'s values: dicts by the keys `expected` names."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and matches(actual[key], value) for key, value in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(matches(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return actual == expected


@pytest.mark.parametrize("actor", ACTORS)
@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(e, id=f"{e.function.split('(')[0]}{'-' + e.variant if e.variant else ''}")
        for e in FUNCTION_MATRIX
    ],
)
async def test_function_matrix(
    owner: asyncpg.Connection,
    alice: uuid.UUID,
    bob: uuid.UUID,
    target: Target,
    entry: Entry,
    actor: Actor,
) -> None:
    async with rolled_back(owner):
        await add_test_model(owner)
        await park_queue(owner)
        await check_matrix_entry(owner, alice, bob, target, entry, actor)


async def check_matrix_entry(
    owner: asyncpg.Connection,
    alice: uuid.UUID,
    bob: uuid.UUID,
    target: Target,
    entry: Entry,
    actor: Actor,
) -> None:
    if entry.overdue:
        await owner.execute(
            "update public.credit_holds set expires_at = now() - interval '1 second'"
            " where hold_id = $1",
            target.hold,
        )
    generation = None
    if entry.job:
        generation = await create_generation(owner, alice, "matrix-job")
    if entry.job == "running":
        async with as_role(owner, "service_role", SERVICE_CLAIMS) as conn:
            job = await claim(conn, "matrix-worker")
        assert job is not None
        assert (job["generation_id"], job["attempt"]) == (str(generation), 1)
    signup, signup_ttl = await owner.fetchrow(
        "select signup_credits, signup_ttl_seconds from credits_private.settings"
    )
    models = await active_models(owner)
    values = {
        "alice": alice,
        "bob": bob,
        "hold": target.hold,
        "debit": target.debit,
        "grant": target.grant,
        "signup": signup,
        "signup_ttl": signup_ttl,
        "models": json.dumps(models),
        "generation": generation,
    }
    args = [values[name] for name in entry.args]
    before, bystander = await snapshot(owner, alice), await snapshot(owner, bob)
    expected = entry.outcomes[actor]
    role, claims = session(actor, alice, bob)

    returned: object = None
    async with as_role(owner, role, claims) as conn:
        if expected == OK:
            value = await conn.fetchval(entry.call, *args)
            if isinstance(value, tuple):  # a row of a batched form
                ordinal, result, error_code, *_ = value
                value = {"ordinal": ordinal, "result": json.loads(result), "error_code": error_code}
            returned = json.loads(value) if isinstance(value, str) else value
        else:
            error = await expect_sqlstate(conn, expected, entry.call, *args)
        not_found = {HOLD_NOT_FOUND: "hold", GENERATION_NOT_FOUND: "generation"}.get(expected)
        if not_found:
            # Another user's hold or generation looks exactly like one that does not exist.
            unknown = [uuid.uuid4() if name == not_found else values[name] for name in entry.args]
            like = await expect_sqlstate(conn, expected, entry.call, *unknown)
            assert (error.message, error.detail) == (like.message, like.detail)
    assert await owner.fetchval("select current_user") != role
    after = await snapshot(owner, alice)

    assert await snapshot(owner, bob) == bystander
    assert await owner.fetchval("select signup_credits from credits_private.settings") == signup
    assert await active_models(owner) == models
    if expected != OK:
        assert after == before
        return
    effect = entry.effect
    assert effect.returns is None or matches(returned, effect.returns), returned
    assert (after.balance - before.balance, after.held - before.held) == (
        effect.balance,
        effect.held,
    )
    assert after.ledger[: len(before.ledger)] == before.ledger
    assert [(row[1], row[2]) for row in after.ledger[len(before.ledger) :]] == list(effect.ledger)
    assert tuple(sorted(str(row[1]) for row in after.holds)) == effect.holds
    assert after.email == before.email
    if effect.generations is None:
        assert after.generations == before.generations
    else:
        assert {row[0] for row in before.generations} <= {row[0] for row in after.generations}
        assert tuple(sorted((str(row[1]), int(str(row[2]))) for row in after.generations)) == (
            effect.generations
        )


async def test_function_matrix_covers_every_credit_function(owner: asyncpg.Connection) -> None:
    in_catalog = {f["signature"] for f in await credit_functions(owner)}
    covered = {(e.function, actor) for e in FUNCTION_MATRIX for actor in e.outcomes}
    assert {function for function, _ in covered} == in_catalog
    assert {(function, actor) for function in in_catalog for actor in ACTORS} == covered
    for entry in FUNCTION_MATRIX:
        assert entry.call.startswith(f"select public.{entry.function.split('(')[0]}("), entry


# 13. Holds change only through the functions: no session captures or releases one directly.

HOLD_WRITES = [
    "update public.credit_holds set state = 'captured' where hold_id = $1",
    "update public.credit_holds set state = 'released' where hold_id = $1",
    "update public.credit_holds set expires_at = now() where hold_id = $1",
    "update public.credit_holds set amount = 1 where hold_id = $1",
    "delete from public.credit_holds where hold_id = $1",
]


@pytest.mark.parametrize("actor", ACTORS)
@pytest.mark.parametrize("statement", HOLD_WRITES)
async def test_no_session_changes_a_hold_directly(
    owner: asyncpg.Connection,
    alice: uuid.UUID,
    bob: uuid.UUID,
    target: Target,
    statement: str,
    actor: Actor,
) -> None:
    before = await snapshot(owner, alice)
    assert (target.hold, "pending", 10) in before.holds
    role, claims = session(actor, alice, bob)
    async with rolled_back(owner), as_role(owner, role, claims) as conn:
        await expect_sqlstate(conn, INSUFFICIENT_PRIVILEGE, statement, target.hold)
    assert await snapshot(owner, alice) == before


# 14. The model catalogue: every session reads it but anon, and only credit_sync_models writes it.

MODEL_WRITES = [
    "insert into public.credit_models (model, cost, timeout_seconds, max_attempts)"
    " values ('evil-model', 1, 1, 1)",
    "update public.credit_models set cost = 1 where model = 'test-model'",
    "update public.credit_models set active = false where model = 'test-model'",
    "delete from public.credit_models where model = 'test-model'",
]


@pytest.mark.parametrize("actor", ["own", "service"])
async def test_sessions_read_the_model_catalogue(
    owner: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID, actor: Actor
) -> None:
    role, claims = session(actor, alice, bob)
    async with rolled_back(owner):
        await add_test_model(owner)
        async with as_role(owner, role, claims) as conn:
            rows = await conn.fetch(
                "select model, cost, timeout_seconds, max_attempts, active"
                " from public.credit_models where model = 'test-model'"
            )
    assert [tuple(r) for r in rows] == [("test-model", 5, 30, 2, True)]


async def test_anon_cannot_read_the_model_catalogue(owner: asyncpg.Connection) -> None:
    async with as_role(owner, "anon", ANON_CLAIMS) as conn:
        await expect_sqlstate(conn, INSUFFICIENT_PRIVILEGE, "select * from public.credit_models")


@pytest.mark.parametrize("actor", ACTORS)
@pytest.mark.parametrize("statement", MODEL_WRITES)
async def test_no_session_writes_the_model_catalogue(
    owner: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID, statement: str, actor: Actor
) -> None:
    role, claims = session(actor, alice, bob)
    async with rolled_back(owner):
        await add_test_model(owner)
        before = await owner.fetch("select * from public.credit_models order by model")
        async with as_role(owner, role, claims) as conn:
            await expect_sqlstate(conn, INSUFFICIENT_PRIVILEGE, statement)
        assert await owner.fetch("select * from public.credit_models order by model") == before


# 15. The worker's side, as the service: a generation is charged exactly once, on success only.
#
# Each test runs in a transaction that is rolled back, with TEST_MODEL in the catalogue and the
# shared queue parked, so the jobs it creates are the only ones a claim can take and no other
# session's worker ever sees them. (now() is the transaction's start throughout.)

CAPTURES = """
    select kind, amount, idempotency_key, transaction_id from public.credit_transactions
     where user_id = $1 and kind = 'capture' order by seq
"""
GENERATION = """
    select state, attempts, lease_owner, output, output_mime_type, error_message, transaction_id,
           next_attempt_at > now() as deferred
      from public.credit_generations where generation_id = $1
"""


@asynccontextmanager
async def worker_queue(owner: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    async with rolled_back(owner):
        await add_test_model(owner)
        await park_queue(owner)
        yield owner


async def new_job(owner: asyncpg.Connection, alice: uuid.UUID, request_id: str) -> uuid.UUID:
    """alice's queued generation of TEST_MODEL, created in her own session."""
    async with as_role(owner, "authenticated", claims_for(alice)) as conn:
        generation = await create_generation(conn, alice, request_id)
    money = await snapshot(owner, alice)
    assert (money.balance, money.held) == (95, 5)
    return generation


def as_service(owner: asyncpg.Connection) -> AbstractAsyncContextManager[Conn]:
    return as_role(owner, "service_role", SERVICE_CLAIMS)


async def test_worker_completes_and_charges_once(
    owner: asyncpg.Connection, alice: uuid.UUID
) -> None:
    async with worker_queue(owner):
        generation = await new_job(owner, alice, "flow-complete")
        async with as_service(owner) as conn:
            job = await claim(conn, "worker-a")
            assert job == {
                "generation_id": str(generation),
                "model": "test-model",
                "prompt": "a cat",
                "parameters": {},
                "attempt": 1,
            }
            assert await claim(conn, "worker-b") is None
            assert await conn.fetchval(
                "select public.credit_renew_generation_lease($1, 'worker-a', 60)", generation
            )
            done = await call(
                conn,
                "select public.credit_complete_generation($1, 'worker-a', $2, 'text/plain')",
                generation,
                "aGVsbG8=",
            )
            again = await call(
                conn,
                "select public.credit_complete_generation($1, 'worker-a', $2, 'text/plain')",
                generation,
                "aGVsbG8=",
            )
        assert done["charged"] is True
        assert done["generation"]["state"] == "succeeded"
        assert again["charged"] is False
        captures = await owner.fetch(CAPTURES, alice)
        assert [tuple(c)[:3] for c in captures] == [("capture", 5, f"generation:{generation}")]
        row = await owner.fetchrow(GENERATION, generation)
        assert row is not None
        assert (row["state"], row["attempts"], row["lease_owner"]) == ("succeeded", 1, None)
        assert (bytes(row["output"]), row["output_mime_type"]) == (b"hello", "text/plain")
        assert row["transaction_id"] == captures[0]["transaction_id"]
        money = await snapshot(owner, alice)
        assert (money.balance, money.held) == (90, 0)
        assert await owner.fetchval(LEDGER_SUM, alice) == 90
        async with as_role(owner, "authenticated", claims_for(alice)) as conn:
            seen = await call(conn, "select public.credit_get_generation($1, null)", generation)
        assert (seen["state"], seen["output"], seen["cost"]) == ("succeeded", "aGVsbG8=", 5)


async def test_worker_retries_then_fails_uncharged(
    owner: asyncpg.Connection, alice: uuid.UUID
) -> None:
    async with worker_queue(owner):
        generation = await new_job(owner, alice, "flow-fail")
        async with as_service(owner) as conn:
            first = await claim(conn, "worker-a")
            assert (first["generation_id"], first["attempt"]) == (str(generation), 1)
            retried = await call(
                conn,
                "select public.credit_fail_generation($1, 'worker-a', 'flaky', true, 60)",
                generation,
            )
            assert (retried["state"], retried["error_message"]) == ("queued", "flaky")
            assert await claim(conn, "worker-b") is None  # not due yet
        row = await owner.fetchrow(GENERATION, generation)
        assert row is not None
        assert (row["state"], row["attempts"], row["lease_owner"], row["deferred"]) == (
            "queued",
            1,
            None,
            True,
        )
        assert (await snapshot(owner, alice)).held == 5
        await owner.execute(
            "update public.credit_generations set next_attempt_at = now() - interval '1s'"
            " where generation_id = $1",
            generation,
        )
        async with as_service(owner) as conn:
            second = await claim(conn, "worker-b")
            assert (second["generation_id"], second["attempt"]) == (str(generation), 2)
            failed = await call(
                conn,
                "select public.credit_fail_generation($1, 'worker-b', 'refused', false, 0)",
                generation,
            )
        assert (failed["state"], failed["error_message"], failed["attempts"]) == (
            "failed",
            "refused",
            2,
        )
        money = await snapshot(owner, alice)
        assert (money.balance, money.held) == (95, 0)
        assert ("released", 5) in [(h[1], h[2]) for h in money.holds]
        assert await owner.fetch(CAPTURES, alice) == []


async def test_worker_result_after_cancel_is_discarded(
    owner: asyncpg.Connection, alice: uuid.UUID
) -> None:
    async with worker_queue(owner):
        generation = await new_job(owner, alice, "flow-cancel")
        async with as_service(owner) as conn:
            job = await claim(conn, "worker-a")
            assert job["generation_id"] == str(generation)
        async with as_role(owner, "authenticated", claims_for(alice)) as conn:
            cancelled = await call(
                conn, "select public.credit_cancel_generation($1, null)", generation
            )
            assert cancelled["state"] == "cancelled"
            await expect_sqlstate(
                conn, "CR010", "select public.credit_cancel_generation($1, null)", generation
            )
        async with as_service(owner) as conn:
            renewed = await conn.fetchval(
                "select public.credit_renew_generation_lease($1, 'worker-a', 60)", generation
            )
            done = await call(
                conn,
                "select public.credit_complete_generation($1, 'worker-a', 'aGk=', 'text/plain')",
                generation,
            )
        assert renewed is False
        assert (done["charged"], done["generation"]["state"]) == (False, "cancelled")
        row = await owner.fetchrow(GENERATION, generation)
        assert row is not None
        assert (row["state"], row["output"], row["transaction_id"]) == ("cancelled", None, None)
        money = await snapshot(owner, alice)
        assert (money.balance, money.held) == (95, 0)
        assert await owner.fetch(CAPTURES, alice) == []


async def test_lost_worker_is_replaced_and_only_the_new_one_charges(
    owner: asyncpg.Connection, alice: uuid.UUID
) -> None:
    async with worker_queue(owner):
        generation = await new_job(owner, alice, "flow-lease")
        async with as_service(owner) as conn:
            first = await claim(conn, "worker-a")
            assert (first["generation_id"], first["attempt"]) == (str(generation), 1)
            assert await claim(conn, "worker-b") is None  # the lease still holds
        await owner.execute(
            "update public.credit_generations set lease_expires_at = now() - interval '1s'"
            " where generation_id = $1",
            generation,
        )
        complete = "select public.credit_complete_generation($1, $2, 'aGk=', 'text/plain')"
        async with as_service(owner) as conn:
            second = await claim(conn, "worker-b")
            assert (second["generation_id"], second["attempt"]) == (str(generation), 2)
            renewed = await conn.fetchval(
                "select public.credit_renew_generation_lease($1, 'worker-a', 60)", generation
            )
            late = await call(conn, complete, generation, "worker-a")
            taken = await conn.fetchrow(GENERATION, generation)
            assert taken is not None
            assert (taken["state"], taken["lease_owner"]) == ("running", "worker-b")
            done = await call(conn, complete, generation, "worker-b")
            again = await call(conn, complete, generation, "worker-b")
        assert renewed is False
        assert (late["charged"], late["generation"]["state"]) == (False, "running")
        assert (done["charged"], done["generation"]["state"]) == (True, "succeeded")
        assert again["charged"] is False
        captures = await owner.fetch(CAPTURES, alice)
        assert [tuple(c)[:3] for c in captures] == [("capture", 5, f"generation:{generation}")]
        money = await snapshot(owner, alice)
        assert (money.balance, money.held) == (90, 0)
        assert await owner.fetchval(LEDGER_SUM, alice) == 90
