"""A ReserveCredits replay returns the original result, whatever became of the hold since, on the
real server over both transports: the hold as the reservation created it (pending) and the
`available` that reservation returned, with `replayed`, and nothing held or written again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf.duration_pb2 import Duration

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, ledger_pb2
from server import app as application
from tests.fixtures.errors import failure
from tests.fixtures.server import SERVICE, User
from tests.fixtures.workers import funded, owner_connection

Stub = credit_service_pb2_grpc.CreditServiceStub
PENDING, CAPTURED = ledger_pb2.HOLD_STATE_PENDING, ledger_pb2.HOLD_STATE_CAPTURED
RELEASED, EXPIRED = ledger_pb2.HOLD_STATE_RELEASED, ledger_pb2.HOLD_STATE_EXPIRED


@pytest.fixture
async def owner(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the schema's owner, to look at (and age) rows directly."""
    async with owner_connection(database_url) as conn:
        yield conn


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=value))
    return duration


def reserve_request(
    amount: int, key: str, ttl: Duration | None = None, description: str = "a video"
) -> pb.ReserveCreditsRequest:
    return pb.ReserveCreditsRequest(
        amount=amount, idempotency_key=key, ttl=ttl or seconds(600), description=description
    )


async def reserve(
    credits: Stub, user: User, request: pb.ReserveCreditsRequest
) -> pb.ReserveCreditsResponse:
    response: pb.ReserveCreditsResponse = await credits.ReserveCredits(
        request, metadata=user.metadata
    )
    return response


async def balance(credits: Stub, user: User) -> tuple[int, int, int]:
    reply = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    return reply.balance, reply.held, reply.available


async def stored(owner: asyncpg.Connection, user: User) -> tuple[object, ...]:
    """Everything of the user's a reservation could write: profile, holds, ledger."""
    profile = await owner.fetchrow(
        "select balance, held, updated_at from public.credit_profiles where user_id = $1", user.id
    )
    holds = await owner.fetch(
        "select hold_id, state, amount, expires_at, created_at, updated_at, available_after"
        " from public.credit_holds where user_id = $1 order by hold_id",
        user.id,
    )
    ledger = await owner.fetch(
        "select transaction_id, kind, amount, balance_after from public.credit_transactions"
        " where user_id = $1 order by seq",
        user.id,
    )
    assert profile is not None
    return tuple(profile), [tuple(r) for r in holds], [tuple(r) for r in ledger]


def assert_original(again: pb.ReserveCreditsResponse, first: pb.ReserveCreditsResponse) -> None:
    assert (first.replayed, again.replayed) == (False, True)
    assert first.hold.state == PENDING
    assert again.hold == first.hold, "the hold as the reservation created it"
    assert again.available == first.available, "the available the reservation returned"


async def test_a_replay_after_a_capture_returns_the_original_reservation(
    credits: Stub, owner: asyncpg.Connection
) -> None:
    user = await funded(credits, 100)
    request = reserve_request(30, "job-1")
    first = await reserve(credits, user, request)
    assert first.available == 70
    captured = await credits.CaptureCredits(
        pb.CaptureCreditsRequest(hold_id=first.hold.hold_id, amount=20, idempotency_key="c"),
        metadata=user.metadata,
    )
    assert captured.hold.state == CAPTURED
    assert await balance(credits, user) == (80, 0, 80)
    before = await stored(owner, user)
    again = await reserve(credits, user, request)
    assert_original(again, first)
    # A service replaying it for the user gets the same answer.
    by_service = await credits.ReserveCredits(
        pb.ReserveCreditsRequest(
            user_id=user.user_id,
            amount=request.amount,
            idempotency_key=request.idempotency_key,
            ttl=request.ttl,
            description=request.description,
        ),
        metadata=SERVICE,
    )
    assert_original(by_service, first)
    assert await stored(owner, user) == before, "a replay holds and writes nothing"
    assert await balance(credits, user) == (80, 0, 80)


async def test_a_replay_after_a_release_returns_the_original_reservation(
    credits: Stub, owner: asyncpg.Connection
) -> None:
    user = await funded(credits, 100)
    request = reserve_request(30, "job-2")
    first = await reserve(credits, user, request)
    released = await credits.ReleaseCredits(
        pb.ReleaseCreditsRequest(hold_id=first.hold.hold_id), metadata=user.metadata
    )
    assert (released.hold.state, released.available) == (RELEASED, 100)
    before = await stored(owner, user)
    again = await reserve(credits, user, request)
    assert_original(again, first)
    assert await stored(owner, user) == before
    assert await balance(credits, user) == (100, 0, 100)


async def test_a_replay_after_expiry_returns_the_original_reservation(
    credits: Stub, server: application.Application, owner: asyncpg.Connection
) -> None:
    user = await funded(credits, 10)
    request = reserve_request(6, "job-3", ttl=seconds(1))
    first = await reserve(credits, user, request)
    assert first.available == 4
    await asyncio.sleep(1.2)
    # Expired by time, before any sweep: the replay still answers with the pending original.
    assert_original(await reserve(credits, user, request), first)
    await server.sweeper.sweep()
    state = await owner.fetchval(
        "select state from public.credit_holds where hold_id = $1", uuid.UUID(first.hold.hold_id)
    )
    assert state == "expired"
    before = await stored(owner, user)
    assert_original(await reserve(credits, user, request), first)
    assert await stored(owner, user) == before
    assert await balance(credits, user) == (10, 0, 10)


async def test_concurrent_replays_all_return_the_original(
    credits: Stub, owner: asyncpg.Connection
) -> None:
    user = await funded(credits, 100)
    request = reserve_request(25, "job-4")
    first = await reserve(credits, user, request)
    await credits.CaptureCredits(
        pb.CaptureCreditsRequest(hold_id=first.hold.hold_id, idempotency_key="c"),
        metadata=user.metadata,
    )
    before = await stored(owner, user)
    replies = await asyncio.gather(*(reserve(credits, user, request) for _ in range(20)))
    for again in replies:
        assert_original(again, first)
    assert await stored(owner, user) == before
    assert await balance(credits, user) == (75, 0, 75)


async def test_racing_first_sends_reserve_once_and_all_answer_alike(credits: Stub) -> None:
    user = await funded(credits, 100)
    request = reserve_request(10, "job-5")
    replies = await asyncio.gather(*(reserve(credits, user, request) for _ in range(20)))
    originals = [r for r in replies if not r.replayed]
    assert len(originals) == 1, "the effect happens exactly once"
    for again in replies:
        if again.replayed:
            assert_original(again, originals[0])
    assert originals[0].available == 90
    assert await balance(credits, user) == (100, 10, 90)


async def test_the_same_key_with_other_parameters_is_still_refused(
    credits: Stub, owner: asyncpg.Connection
) -> None:
    user = await funded(credits, 100)
    first = await reserve(credits, user, reserve_request(30, "job-6"))
    await credits.CaptureCredits(
        pb.CaptureCreditsRequest(hold_id=first.hold.hold_id, idempotency_key="c"),
        metadata=user.metadata,
    )
    before = await stored(owner, user)
    for other in (
        reserve_request(31, "job-6"),
        reserve_request(30, "job-6", ttl=seconds(601)),
        reserve_request(30, "job-6", description="another video"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await reserve(credits, user, other)
        found = failure(raised.value)
        assert (found.code, found.reason) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "IDEMPOTENCY_KEY_REUSED",
        )
    assert await stored(owner, user) == before


async def test_the_reservation_keeps_the_available_it_returned(
    credits: Stub, owner: asyncpg.Connection
) -> None:
    user = await funded(credits, 100)
    first = await reserve(credits, user, reserve_request(30, "job-7"))
    second = await reserve(credits, user, reserve_request(20, "job-8"))
    assert (first.available, second.available) == (70, 50)
    rows = await owner.fetch(
        "select idempotency_key, available_after from public.credit_holds where user_id = $1",
        user.id,
    )
    assert {r["idempotency_key"]: r["available_after"] for r in rows} == {
        "job-7": 70,
        "job-8": 50,
    }
    # The first replayed after the second: its own figure, not today's 50.
    assert_original(await reserve(credits, user, reserve_request(30, "job-7")), first)


async def test_a_hold_made_before_the_column_replays_with_todays_available(
    credits: Stub, owner: asyncpg.Connection
) -> None:
    user = await funded(credits, 100)
    request = reserve_request(30, "job-9")
    first = await reserve(credits, user, request)
    # A hold from before 20261202000300_credits_reserve_replay.sql has no available_after.
    await owner.execute(
        "update public.credit_holds set available_after = null where hold_id = $1",
        uuid.UUID(first.hold.hold_id),
    )
    await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=5, idempotency_key="d"), metadata=user.metadata
    )
    again = await reserve(credits, user, request)
    assert again.replayed
    assert again.hold == first.hold
    assert again.available == 65, "today's available, as replays of such holds answered before"
