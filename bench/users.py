"""The bench's users: profiles with enough credits for any run, and their access tokens."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from server.auth.tokens import mint_user_token

RICH = 10**15
# How many users the bench makes (pgbench and the echo floors draw from them too).
COUNT = 1000
# Live grants of each user of the five-grant DebitCredits (users COUNT + 1 to 2 * COUNT).
GRANTS = 5


def user_id(n: int) -> uuid.UUID:
    """The n-th bench user (1-based), an id pgbench can build from a number too."""
    return uuid.UUID(f"00000000-0000-4000-8000-{n:012d}")


async def create(database_url: str, count: int) -> None:
    """Profiles for users 1..count, each granted RICH credits once (re-runs change nothing)."""
    conn = await asyncpg.connect(database_url, server_settings={"role": "service_role"})
    try:
        await conn.executemany(
            "select public.credit_provision_profile(p_user_id => $1, p_email => '')",
            [(user_id(n),) for n in range(1, count + 1)],
        )
        await conn.executemany(
            "select public.credit_grant(p_user_id => $1, p_amount => $2,"
            " p_idempotency_key => 'bench-grant', p_description => 'bench', p_metadata => '{}')",
            [(user_id(n), RICH) for n in range(1, count + 1)],
        )
    finally:
        await conn.close()


def tokens(secret: str, count: int) -> list[str]:
    return [mint_user_token(secret, user_id(n)) for n in range(1, count + 1)]


def with_grants(n: int) -> uuid.UUID:
    """The n-th user (1-based) of the five-grant scenario: after the COUNT plain ones."""
    return user_id(COUNT + n)


async def create_with_grants(database_url: str, count: int, grants: int = GRANTS) -> None:
    """Profiles for `count` users past the plain ones, each with `grants` live grants of
    RICH credits: unscoped, of other priorities and expiries (one never expiring), so that a
    debit weighs them all in the burn-down order (re-runs change nothing)."""
    conn = await asyncpg.connect(database_url, server_settings={"role": "service_role"})
    # A fixed far future: the same request again is a replay, whenever the bench runs.
    far = datetime(2100, 1, 1, tzinfo=UTC)
    try:
        await conn.executemany(
            "select public.credit_provision_profile(p_user_id => $1, p_email => '')",
            [(with_grants(n),) for n in range(1, count + 1)],
        )
        for g in range(grants):
            expires = None if g == grants - 1 else far + timedelta(days=g)
            await conn.executemany(
                "select public.credit_grant(p_user_id => $1, p_amount => $2,"
                " p_idempotency_key => $3, p_description => 'bench', p_metadata => '{}',"
                " p_expire_time => $4, p_priority => $5)",
                [
                    (with_grants(n), RICH, f"bench-grant-{g}", expires, 50 - g)
                    for n in range(1, count + 1)
                ],
            )
    finally:
        await conn.close()


def tokens_with_grants(secret: str, count: int) -> list[str]:
    return [mint_user_token(secret, with_grants(n)) for n in range(1, count + 1)]


# The GetUsage users: one with a thousand ledger entries in the bench month, one with a million
# (after the five-grant users).
USAGE_ENTRIES = (1_000, 1_000_000)
USAGE_MONTH = datetime(2026, 11, 1, tzinfo=UTC)
USAGE_HOURS = 30 * 24


def with_usage(entries: int) -> uuid.UUID:
    return user_id(2 * COUNT + 1 + USAGE_ENTRIES.index(entries))


async def create_with_usage(database_url: str) -> None:
    """The GetUsage users: their usage rollup as the ledger trigger writes it for `entries`
    entries spread over USAGE_MONTH (every hour of it; kinds, four scopes, both grant
    categories), built in one statement as the owner instead of by a million RPCs (GetUsage
    reads the rollup only). Re-runs change nothing."""
    conn = await asyncpg.connect(database_url)
    try:
        for entries in USAGE_ENTRIES:
            user = with_usage(entries)
            await conn.execute("select public.credit_provision_profile($1, '')", user)
            await conn.execute(
                "select credits_private.add_usage(x.u, x.hour, x.kind, x.scope, x.category,"
                " x.amount) from (select $1::uuid as u,"
                " $2::timestamptz + (n % $4::integer) * interval '1 hour' as hour,"
                " (array['debit', 'capture', 'grant', 'refund'])[1 + n % 4] as kind,"
                " case when n % 4 = 2 then '' else (array['', 'a', 'b', 'c'])[1 + n / 7 % 4] end"
                " as scope, (array['paid', 'promotional'])[1 + n / 11 % 2] as category,"
                " sum(1 + n % 5) as amount"
                " from generate_series(0, $3::integer - 1) n group by 1, 2, 3, 4, 5) x"
                " where not exists (select 1 from public.credit_usage where user_id = $1)",
                user,
                USAGE_MONTH,
                entries,
                USAGE_HOURS,
            )
    finally:
        await conn.close()


def token_with_usage(secret: str, entries: int) -> str:
    return mint_user_token(secret, with_usage(entries))
