"""The bench's users: profiles with enough credits for any run, and their access tokens."""

from __future__ import annotations

import uuid

import asyncpg

from server.auth.tokens import mint_user_token

RICH = 10**15
# How many users the bench makes (pgbench and the echo floors draw from them too).
COUNT = 1000


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
