"""A generation's hold belongs to the generation: CaptureCredits and ReleaseCredits refuse it
(FAILED_PRECONDITION / HOLD_NOT_PENDING, naming the generation) and change nothing, for its user
and for a service alike, and the generation's own lifecycle still settles it: charged once when
it succeeds, never when it is cancelled. On the real server, over both transports.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from credits.v1 import credit_service_pb2 as cpb
from credits.v1 import generation_pb2
from credits.v1 import generation_service_pb2 as gpb
from server import app as application
from tests.fixtures.errors import Failure, failure
from tests.fixtures.server import SERVICE, Metadata, User
from tests.fixtures.workers import (
    CANCELLED,
    COST,
    RUNNING,
    SUCCEEDED,
    CreditStub,
    GenerationStub,
    balance,
    cancel_unfinished,
    captures,
    create,
    funded,
    owner_connection,
    running_workers,
    wait_for,
)

START = 100
REFUSAL = (
    "the hold belongs to generation {}: it is captured when the generation succeeds and"
    " released when it fails or is cancelled"
)


@pytest.fixture
async def made(generations: GenerationStub) -> AsyncIterator[list[str]]:
    """Generation ids a test creates; any not final at its end is cancelled, so that no worker
    of a later test runs it."""
    ids: list[str] = []
    yield ids
    await cancel_unfinished(generations, ids)


async def money(database_url: str, user: User) -> tuple[object, ...]:
    """Everything of `user`'s money as the owner reads it: profile, holds and the whole ledger."""
    async with owner_connection(database_url) as conn:
        profile = await conn.fetchrow(
            "select balance, held, updated_at from public.credit_profiles where user_id = $1",
            user.id,
        )
        holds = await conn.fetch(
            "select hold_id, state, amount, updated_at from public.credit_holds"
            " where user_id = $1 order by hold_id",
            user.id,
        )
        ledger = await conn.fetch(
            "select transaction_id, kind, amount from public.credit_transactions"
            " where user_id = $1 order by seq",
            user.id,
        )
    return tuple(profile or ()), [tuple(h) for h in holds], [tuple(t) for t in ledger]


async def refused(call: object) -> tuple[Failure, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return failure(raised.value), raised.value.details() or ""


async def assert_both_refused(
    credits: CreditStub,
    database_url: str,
    user: User,
    generation: generation_pb2.Generation,
    state: str,
) -> None:
    """CaptureCredits (whole and part) and ReleaseCredits of the generation's hold, by its user
    and by a service, each refused as HOLD_NOT_PENDING naming the generation; nothing moves."""
    before = await money(database_url, user)
    callers: tuple[Metadata, ...] = (user.metadata, SERVICE)
    for metadata in callers:
        calls = [
            credits.CaptureCredits(
                cpb.CaptureCreditsRequest(
                    hold_id=generation.hold_id, amount=amount, idempotency_key=uuid.uuid4().hex
                ),
                metadata=metadata,
            )
            for amount in (0, 1)
        ] + [
            credits.ReleaseCredits(
                cpb.ReleaseCreditsRequest(hold_id=generation.hold_id), metadata=metadata
            )
        ]
        for call in calls:
            found, message = await refused(call)
            assert (found.code, found.reason, found.metadata) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "HOLD_NOT_PENDING",
                {"state": state, "generation_id": generation.generation_id},
            )
            assert message == REFUSAL.format(generation.generation_id)
    assert await money(database_url, user) == before


async def test_a_queued_generations_hold_is_refused_then_charged_once_on_success(
    server: application.Application,
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
    made: list[str],
) -> None:
    user = await funded(credits, START)
    created = await create(generations, user)
    made.append(created.generation_id)
    await assert_both_refused(credits, database_url, user, created, "pending")
    assert await balance(credits, user) == (START, COST)
    assert await captures(credits, user) == []
    async with running_workers(server):
        final = await wait_for(generations, user, created.generation_id)
    assert final.state == SUCCEEDED
    charges = await captures(credits, user)
    assert [(t.amount, t.hold_id, t.transaction_id) for t in charges] == [
        (COST, created.hold_id, final.transaction_id)
    ]
    assert await balance(credits, user) == (START - COST, 0)
    # Settled by the generation, and still not the caller's to capture or release.
    await assert_both_refused(credits, database_url, user, final, "captured")


async def test_a_running_generations_hold_is_refused_and_the_run_still_succeeds(
    server: application.Application,
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
    made: list[str],
) -> None:
    user = await funded(credits, START)
    created = await create(generations, user, parameters={"delay_ms": "1500"})
    made.append(created.generation_id)
    async with running_workers(server):
        await wait_for(generations, user, created.generation_id, {RUNNING}, within=5)
        await assert_both_refused(credits, database_url, user, created, "pending")
        final = await wait_for(generations, user, created.generation_id)
    assert (final.state, final.attempts) == (SUCCEEDED, 1)
    assert [t.amount for t in await captures(credits, user)] == [COST]
    assert await balance(credits, user) == (START - COST, 0)


async def test_a_refused_generation_hold_can_still_be_cancelled_uncharged(
    credits: CreditStub, generations: GenerationStub, database_url: str, made: list[str]
) -> None:
    user = await funded(credits, START)
    created = await create(generations, user)
    made.append(created.generation_id)
    await assert_both_refused(credits, database_url, user, created, "pending")
    reply = await generations.CancelGeneration(
        gpb.CancelGenerationRequest(generation_id=created.generation_id), metadata=user.metadata
    )
    assert reply.generation.state == CANCELLED
    assert reply.generation.transaction_id == ""
    assert await captures(credits, user) == []
    assert await balance(credits, user) == (START, 0)
    await assert_both_refused(credits, database_url, user, reply.generation, "released")


async def test_a_hold_is_a_generations_by_the_generation_not_by_its_key(
    credits: CreditStub, generations: GenerationStub
) -> None:
    # A user's own hold whose key looks like a generation's is an ordinary hold.
    user = await funded(credits, START)
    hold = (
        await credits.ReserveCredits(
            cpb.ReserveCreditsRequest(amount=7, idempotency_key=f"generation:{uuid.uuid4()}"),
            metadata=user.metadata,
        )
    ).hold
    reply = await credits.CaptureCredits(
        cpb.CaptureCreditsRequest(hold_id=hold.hold_id, idempotency_key="c"),
        metadata=user.metadata,
    )
    assert (reply.transaction.amount, reply.balance) == (7, START - 7)
