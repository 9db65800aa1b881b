"""JSON the database answers with reaches the service exactly as it is stored: numbers a direct
SQL caller put in a transaction's metadata (past 64 bits, past a double's range, fractions) read
back to the last digit through the direct transport's orjson reader (json_values)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio

from server.repository import functions
from server.transports.postgres import PostgresTransport

METADATA = '{"big": 123456789012345678901234567890, "huge": 1e400, "fraction": 0.1, "n": 7}'


@pytest_asyncio.fixture
async def transport(database_url: str) -> AsyncIterator[PostgresTransport]:
    opened = await PostgresTransport.connect(database_url, min_size=1, max_size=1)
    yield opened
    await opened.close()


async def test_numbers_in_metadata_written_by_sql_read_back_exactly(
    transport: PostgresTransport, database_url: str
) -> None:
    user_id = uuid.uuid4()
    service = transport.service()
    await service.call(functions.ProvisionProfile(user_id, ""))
    await service.call(
        functions.GrantCredits(user_id, 10, f"fund-{user_id}", "", {}, None, None, 50, "paid", [])
    )
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(
            "select public.credit_debit(p_user_id => $1, p_amount => 1,"
            " p_idempotency_key => 'numbers', p_metadata => $2::jsonb)",
            user_id,
            METADATA,
        )
    finally:
        await owner.close()

    listing = functions.ListTransactions(user_id, 10, None, None, None, None)
    [debit, _grant] = listing.decode(await service.call(listing))

    # jsonb keeps numbers as numeric: 1e400 comes back written out, an integer of 401 digits.
    assert debit.metadata == {
        "big": 123456789012345678901234567890,
        "fraction": 0.1,
        "huge": 10**400,
        "n": 7,
    }
    assert [type(debit.metadata[key]) for key in ("big", "fraction", "huge", "n")] == [
        int,
        float,
        int,
        int,
    ]
