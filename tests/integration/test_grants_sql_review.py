"""Credit grants in SQL, the cases a line-by-line review of the grants migrations found wrong:
each test failed before the migration that mends it (named in its docstring).

Same database and helpers as tests/integration/test_grants_sql.py (a database of this module's
own: the tests move the clock).
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg

from tests.integration.test_grants_sql import (
    advance,
    assert_consistent,
    debit,
    give,
    grants_db,
    ledger,
    new_user,
    now,
    owner,
    profile,
    refused,
    sweep,
)

__all__ = ["grants_db", "owner"]  # the fixtures this module uses, imported with the helpers

BALANCE_LIMIT_EXCEEDED = "CR011"
LARGEST = 2**63 - 1


async def test_a_refund_counts_pending_grants_against_the_balance_limit(
    owner: asyncpg.Connection,
) -> None:
    """A refund is judged against the balance the user will have once their pending grants take
    effect, as a grant is: otherwise the grant's activation overflows the balance, and every
    call of the user's and every run of the sweeper fails from then on
    (20261204600000_credits_refund_headroom_counts_pending_grants.sql)."""
    user = await new_user(owner)
    await give(owner, user, 100)
    spent = await debit(owner, user, 100)
    start = await now(owner)
    await give(owner, user, LARGEST, effective=start + timedelta(days=1))
    before = await ledger(owner, user)
    detail = await refused(
        owner,
        BALANCE_LIMIT_EXCEEDED,
        "select public.credit_refund(null, $1, 0, 'refund-past-the-limit')",
        uuid.UUID(spent["transaction"]["transaction_id"]),
    )
    assert detail == {"balance": LARGEST, "amount": 100, "limit": LARGEST}
    assert await ledger(owner, user) == before
    # The grant takes effect: the sweeper and the user's own calls go on working.
    await advance(owner, timedelta(days=2))
    assert await sweep(owner) >= 1
    assert (await profile(owner, user))["balance"] == LARGEST
    assert (await debit(owner, user, 1))["balance"] == LARGEST - 1
    await assert_consistent(owner, user)


async def test_a_grant_with_a_fractional_expiry_replays_whatever_the_float_output(
    owner: asyncpg.Connection,
) -> None:
    """A grant's fingerprint holds its times as epoch seconds, written as a float: a session
    with fewer float digits (extra_float_digits = 0, as some drivers and poolers set it) wrote
    them rounded, so a retry from it was refused as a key reused instead of replayed
    (20261204600010_credits_grant_fingerprint_float_digits.sql)."""
    user = await new_user(owner)
    start = await now(owner)
    # 16 significant digits of epoch seconds: more than 15.
    expire = (start + timedelta(days=30)).replace(microsecond=123456)
    effective = (start + timedelta(days=1)).replace(microsecond=654321)
    first = await give(owner, user, 10, key="float-digits", expire=expire, effective=effective)
    async with owner.transaction():
        await owner.execute("set local extra_float_digits = 0")
        again = await give(owner, user, 10, key="float-digits", expire=expire, effective=effective)
    assert again["replayed"] is True
    assert again["grant"] == first["grant"]
