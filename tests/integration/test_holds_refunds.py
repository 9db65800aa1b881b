"""Two-phase holds and refunds end to end, including their races, on the real server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, ledger_pb2
from server import app as application
from tests.fixtures.errors import Failure, failure
from tests.fixtures.server import SERVICE, User, new_user

Stub = credit_service_pb2_grpc.CreditServiceStub
PENDING, CAPTURED = ledger_pb2.HOLD_STATE_PENDING, ledger_pb2.HOLD_STATE_CAPTURED
RELEASED, EXPIRED = ledger_pb2.HOLD_STATE_RELEASED, ledger_pb2.HOLD_STATE_EXPIRED


async def funded(credits: Stub, amount: int) -> User:
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    if amount:
        await credits.GrantCredits(
            pb.GrantCreditsRequest(user_id=user.user_id, amount=amount, idempotency_key="seed"),
            metadata=SERVICE,
        )
    return user


async def balance(credits: Stub, user: User) -> tuple[int, int, int]:
    reply = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    return reply.balance, reply.held, reply.available


async def reserve(
    credits: Stub, user: User, amount: int, key: str = "", ttl: Duration | None = None
) -> pb.ReserveCreditsResponse:
    response: pb.ReserveCreditsResponse = await credits.ReserveCredits(
        pb.ReserveCreditsRequest(amount=amount, idempotency_key=key or uuid.uuid4().hex, ttl=ttl),
        metadata=user.metadata,
    )
    return response


async def fails(call: object) -> Failure:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return failure(raised.value)


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=value))
    return duration


# Reserve


async def test_reserve_sets_credits_aside(credits: Stub) -> None:
    user = await funded(credits, 100)
    reply = await reserve(credits, user, 30, key="job-1")
    hold = reply.hold
    assert (reply.available, reply.replayed) == (70, False)
    assert (hold.user_id, hold.amount, hold.state, hold.idempotency_key) == (
        user.user_id,
        30,
        PENDING,
        "job-1",
    )
    ttl = hold.expire_time.ToDatetime() - hold.create_time.ToDatetime()
    assert abs(ttl - timedelta(minutes=15)) < timedelta(seconds=1), "the default ttl"
    assert await balance(credits, user) == (100, 30, 70)


async def test_reserve_beyond_available_fails_and_holds_nothing(credits: Stub) -> None:
    user = await funded(credits, 50)
    await reserve(credits, user, 40)
    found = await fails(reserve(credits, user, 20))
    assert (found.code, found.reason, found.metadata) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
        {"required": "20", "available": "10"},
    )
    assert await balance(credits, user) == (50, 40, 10)


async def test_held_credits_cannot_be_debited(credits: Stub) -> None:
    user = await funded(credits, 10)
    await reserve(credits, user, 8)
    found = await fails(
        credits.DebitCredits(
            pb.DebitCreditsRequest(amount=3, idempotency_key="d"), metadata=user.metadata
        )
    )
    assert found.metadata == {"required": "3", "available": "2"}


@pytest.mark.parametrize("ttl", [seconds(0), seconds(-5), seconds(24 * 3600 + 1)])
async def test_a_ttl_out_of_range_names_the_field(credits: Stub, ttl: Duration) -> None:
    user = await funded(credits, 10)
    found = await fails(reserve(credits, user, 1, ttl=ttl))
    assert (found.code, found.field_violations) == (grpc.StatusCode.INVALID_ARGUMENT, ["ttl"])


async def test_a_replayed_reserve_returns_the_same_hold(credits: Stub) -> None:
    user = await funded(credits, 10)
    first = await reserve(credits, user, 4, key="r")
    again = await reserve(credits, user, 4, key="r")
    assert again.replayed
    assert again.hold.hold_id == first.hold.hold_id
    assert await balance(credits, user) == (10, 4, 6)
    reused = await fails(reserve(credits, user, 5, key="r"))
    assert (reused.code, reused.reason) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )


# Capture and release


async def test_capture_charges_the_whole_hold(credits: Stub) -> None:
    user = await funded(credits, 100)
    hold = (await reserve(credits, user, 30)).hold
    reply = await credits.CaptureCredits(
        pb.CaptureCreditsRequest(hold_id=hold.hold_id, idempotency_key="c"),
        metadata=user.metadata,
    )
    tx = reply.transaction
    assert (tx.kind, tx.amount, tx.hold_id, tx.balance_after) == (
        ledger_pb2.TRANSACTION_KIND_CAPTURE,
        30,
        hold.hold_id,
        70,
    )
    assert (reply.hold.state, reply.balance, reply.replayed) == (CAPTURED, 70, False)
    assert await balance(credits, user) == (70, 0, 70)


async def test_a_partial_capture_releases_the_rest(credits: Stub) -> None:
    user = await funded(credits, 100)
    hold = (await reserve(credits, user, 30)).hold
    reply = await credits.CaptureCredits(
        pb.CaptureCreditsRequest(hold_id=hold.hold_id, amount=12, idempotency_key="c"),
        metadata=SERVICE,
    )
    assert (reply.transaction.amount, reply.balance) == (12, 88)
    assert await balance(credits, user) == (88, 0, 88)


async def test_capturing_more_than_the_hold_is_invalid(credits: Stub) -> None:
    user = await funded(credits, 100)
    hold = (await reserve(credits, user, 30)).hold
    found = await fails(
        credits.CaptureCredits(
            pb.CaptureCreditsRequest(hold_id=hold.hold_id, amount=31, idempotency_key="c"),
            metadata=user.metadata,
        )
    )
    assert (found.code, found.field_violations) == (grpc.StatusCode.INVALID_ARGUMENT, ["amount"])
    assert await balance(credits, user) == (100, 30, 70)


async def test_a_replayed_capture_charges_once(credits: Stub) -> None:
    user = await funded(credits, 100)
    hold = (await reserve(credits, user, 30)).hold
    request = pb.CaptureCreditsRequest(hold_id=hold.hold_id, amount=10, idempotency_key="c")
    first = await credits.CaptureCredits(request, metadata=user.metadata)
    again = await credits.CaptureCredits(request, metadata=user.metadata)
    assert again.replayed
    assert again.transaction == first.transaction
    assert await balance(credits, user) == (90, 0, 90)


async def test_release_returns_the_credits_once(credits: Stub) -> None:
    user = await funded(credits, 100)
    hold = (await reserve(credits, user, 30)).hold
    release = pb.ReleaseCreditsRequest(hold_id=hold.hold_id)
    first = await credits.ReleaseCredits(release, metadata=user.metadata)
    assert (first.hold.state, first.available) == (RELEASED, 100)
    # A second release (a retry after a lost reply, say) tells what became of the hold.
    for metadata in (user.metadata, SERVICE):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await credits.ReleaseCredits(release, metadata=metadata)
        assert raised.value.details() == "the hold is no longer pending: it was already released"
        found = failure(raised.value)
        assert (found.code, found.reason, found.metadata) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "HOLD_NOT_PENDING",
            {"state": "released"},
        )
    found = await fails(
        credits.CaptureCredits(
            pb.CaptureCreditsRequest(hold_id=hold.hold_id, idempotency_key="late"),
            metadata=user.metadata,
        )
    )
    assert (found.code, found.reason, found.metadata) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "HOLD_NOT_PENDING",
        {"state": "released"},
    )
    assert await balance(credits, user) == (100, 0, 100)


async def test_a_captured_hold_cannot_be_released(credits: Stub) -> None:
    user = await funded(credits, 100)
    hold = (await reserve(credits, user, 30)).hold
    await credits.CaptureCredits(
        pb.CaptureCreditsRequest(hold_id=hold.hold_id, idempotency_key="c"),
        metadata=user.metadata,
    )
    found = await fails(
        credits.ReleaseCredits(pb.ReleaseCreditsRequest(hold_id=hold.hold_id), metadata=SERVICE)
    )
    assert (found.reason, found.metadata) == ("HOLD_NOT_PENDING", {"state": "captured"})
    assert await balance(credits, user) == (70, 0, 70)


async def test_another_users_hold_is_not_found_like_an_unknown_one(credits: Stub) -> None:
    owner, stranger = await funded(credits, 10), await funded(credits, 10)
    hold = (await reserve(credits, owner, 5)).hold
    for hold_id in (hold.hold_id, str(uuid.uuid4())):
        capture = await fails(
            credits.CaptureCredits(
                pb.CaptureCreditsRequest(hold_id=hold_id, idempotency_key="x"),
                metadata=stranger.metadata,
            )
        )
        release = await fails(
            credits.ReleaseCredits(
                pb.ReleaseCreditsRequest(hold_id=hold_id), metadata=stranger.metadata
            )
        )
        for found in (capture, release):
            assert (found.code, found.reason) == (grpc.StatusCode.NOT_FOUND, "HOLD_NOT_FOUND")
    assert await balance(credits, owner) == (10, 5, 5)


# Expiry


async def test_an_expired_hold_stops_counting_before_any_sweep(
    credits: Stub, server: application.Application, database_url: str
) -> None:
    user = await funded(credits, 10)
    hold = (await reserve(credits, user, 6, ttl=seconds(1))).hold
    assert await balance(credits, user) == (10, 6, 4)
    await asyncio.sleep(1.2)
    assert await balance(credits, user) == (10, 0, 10)
    found = await fails(
        credits.CaptureCredits(
            pb.CaptureCreditsRequest(hold_id=hold.hold_id, idempotency_key="too-late"),
            metadata=user.metadata,
        )
    )
    assert (found.code, found.reason, found.metadata) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "HOLD_NOT_PENDING",
        {"state": "expired"},
    )
    found = await fails(
        credits.ReleaseCredits(pb.ReleaseCreditsRequest(hold_id=hold.hold_id), metadata=SERVICE)
    )
    assert (found.reason, found.metadata) == ("HOLD_NOT_PENDING", {"state": "expired"})


async def test_the_sweeper_marks_overdue_holds_expired(
    credits: Stub, server: application.Application, database_url: str
) -> None:
    user = await funded(credits, 10)
    hold = (await reserve(credits, user, 6, ttl=seconds(1))).hold
    await asyncio.sleep(1.2)
    await server.sweeper.sweep()
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "select h.state, p.held from credit_holds h join credit_profiles p using (user_id)"
            " where h.hold_id = $1",
            uuid.UUID(hold.hold_id),
        )
    finally:
        await conn.close()
    assert row is not None
    assert (row["state"], row["held"]) == ("expired", 0)


# Refunds


async def debit(credits: Stub, user: User, amount: int, key: str) -> pb.DebitCreditsResponse:
    response: pb.DebitCreditsResponse = await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=amount, idempotency_key=key), metadata=user.metadata
    )
    return response


def refund_request(
    user: User, transaction_id: str, amount: int, key: str
) -> pb.RefundCreditsRequest:
    return pb.RefundCreditsRequest(
        user_id=user.user_id, transaction_id=transaction_id, amount=amount, idempotency_key=key
    )


async def test_refunds_return_what_is_left_and_no_more(credits: Stub) -> None:
    user = await funded(credits, 100)
    spent = (await debit(credits, user, 40, "d")).transaction
    part = await credits.RefundCredits(
        refund_request(user, spent.transaction_id, 15, "r1"), metadata=SERVICE
    )
    rest = await credits.RefundCredits(
        refund_request(user, spent.transaction_id, 0, "r2"), metadata=SERVICE
    )
    assert (part.transaction.kind, part.transaction.amount, part.balance) == (
        ledger_pb2.TRANSACTION_KIND_REFUND,
        15,
        75,
    )
    assert part.transaction.refunded_transaction_id == spent.transaction_id
    assert (rest.transaction.amount, rest.balance) == (25, 100)
    found = await fails(
        credits.RefundCredits(refund_request(user, spent.transaction_id, 1, "r3"), metadata=SERVICE)
    )
    assert (found.code, found.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFUND_EXCEEDS_DEBIT",
    )


async def test_a_capture_can_be_refunded(credits: Stub) -> None:
    user = await funded(credits, 100)
    hold = (await reserve(credits, user, 30)).hold
    captured = await credits.CaptureCredits(
        pb.CaptureCreditsRequest(hold_id=hold.hold_id, idempotency_key="c"), metadata=SERVICE
    )
    refund = await credits.RefundCredits(
        refund_request(user, captured.transaction.transaction_id, 0, "r"), metadata=SERVICE
    )
    assert (refund.transaction.amount, refund.balance) == (30, 100)


async def test_refunds_are_for_services_and_for_debits_only(credits: Stub) -> None:
    user = await funded(credits, 100)
    spent = (await debit(credits, user, 10, "d")).transaction
    denied = await fails(
        credits.RefundCredits(
            refund_request(user, spent.transaction_id, 0, "r"), metadata=user.metadata
        )
    )
    assert (denied.code, denied.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    grants = await credits.ListTransactions(
        pb.ListTransactionsRequest(kinds=[ledger_pb2.TRANSACTION_KIND_GRANT]),
        metadata=user.metadata,
    )
    grant_id = grants.transactions[0].transaction_id
    invalid = await fails(
        credits.RefundCredits(refund_request(user, grant_id, 0, "r"), metadata=SERVICE)
    )
    assert invalid.field_violations == ["transaction_id"]


async def test_another_users_transaction_is_not_found(credits: Stub) -> None:
    owner, other = await funded(credits, 10), await funded(credits, 10)
    spent = (await debit(credits, owner, 5, "d")).transaction
    for transaction_id in (spent.transaction_id, str(uuid.uuid4())):
        found = await fails(
            credits.RefundCredits(refund_request(other, transaction_id, 0, "r"), metadata=SERVICE)
        )
        assert (found.code, found.reason) == (grpc.StatusCode.NOT_FOUND, "TRANSACTION_NOT_FOUND")


# Races


async def test_capture_and_release_racing_on_one_hold(credits: Stub) -> None:
    for _ in range(5):
        user = await funded(credits, 100)
        hold = (await reserve(credits, user, 30)).hold
        outcomes = await asyncio.gather(
            credits.CaptureCredits(
                pb.CaptureCreditsRequest(hold_id=hold.hold_id, idempotency_key="c"),
                metadata=user.metadata,
            ),
            credits.ReleaseCredits(
                pb.ReleaseCreditsRequest(hold_id=hold.hold_id), metadata=user.metadata
            ),
            return_exceptions=True,
        )
        errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(errors) == 1, outcomes
        assert failure(errors[0]).reason == "HOLD_NOT_PENDING"
        captured = not isinstance(outcomes[0], BaseException)
        assert await balance(credits, user) == ((70, 0, 70) if captured else (100, 0, 100))


async def test_concurrent_refunds_never_exceed_the_debit(credits: Stub) -> None:
    user = await funded(credits, 100)
    spent = (await debit(credits, user, 10, "d")).transaction
    outcomes = await asyncio.gather(
        *(
            credits.RefundCredits(
                refund_request(user, spent.transaction_id, 3, f"r{i}"), metadata=SERVICE
            )
            for i in range(10)
        ),
        return_exceptions=True,
    )
    succeeded = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(succeeded) == 3
    for error in outcomes:
        if isinstance(error, grpc.aio.AioRpcError):
            assert failure(error).reason == "REFUND_EXCEEDS_DEBIT"
    assert await balance(credits, user) == (99, 0, 99)


async def test_reserves_racing_debits_never_overdraw(credits: Stub) -> None:
    user = await funded(credits, 50)
    calls = [reserve(credits, user, 3, key=f"r{i}") for i in range(20)] + [
        debit(credits, user, 2, f"d{i}") for i in range(20)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for error in outcomes:
        if isinstance(error, BaseException):
            assert isinstance(error, grpc.aio.AioRpcError)
            assert failure(error).reason == "INSUFFICIENT_CREDITS"
    held = sum(3 for o in outcomes[:20] if not isinstance(o, BaseException))
    spent = sum(2 for o in outcomes[20:] if not isinstance(o, BaseException))
    total, now_held, available = await balance(credits, user)
    assert (total, now_held) == (50 - spent, held)
    assert 0 <= available <= 1, "the race leaves less than the smallest request"


async def test_overdraft_race_lets_exactly_the_balance_through(credits: Stub) -> None:
    user = await funded(credits, 10)
    outcomes = await asyncio.gather(
        *(debit(credits, user, 1, f"d{i}") for i in range(50)), return_exceptions=True
    )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 10
    assert await balance(credits, user) == (0, 0, 0)


# Listing filters


async def test_transactions_can_be_filtered_by_kind_and_time(credits: Stub) -> None:
    user = await funded(credits, 100)
    await debit(credits, user, 1, "d1")
    middle = Timestamp()
    middle.GetCurrentTime()
    await asyncio.sleep(0.01)
    await debit(credits, user, 2, "d2")

    async def keys(**filters: object) -> list[str]:
        reply = await credits.ListTransactions(
            pb.ListTransactionsRequest(**filters),  # type: ignore[arg-type]
            metadata=user.metadata,
        )
        return [t.idempotency_key for t in reply.transactions]

    assert await keys(kinds=[ledger_pb2.TRANSACTION_KIND_DEBIT]) == ["d2", "d1"]
    assert await keys(kinds=[ledger_pb2.TRANSACTION_KIND_GRANT]) == ["seed"]
    assert await keys(start_time=middle) == ["d2"]
    assert await keys(end_time=middle) == ["d1", "seed"]
    found = await fails(
        credits.ListTransactions(
            pb.ListTransactionsRequest(start_time=middle, end_time=middle), metadata=user.metadata
        )
    )
    assert found.field_violations == ["end_time"]


async def test_a_page_token_is_bound_to_its_filter(credits: Stub) -> None:
    user = await funded(credits, 100)
    for i in range(3):
        await debit(credits, user, 1, f"d{i}")
    debits = [ledger_pb2.TRANSACTION_KIND_DEBIT]
    page = await credits.ListTransactions(
        pb.ListTransactionsRequest(page_size=2, kinds=debits), metadata=user.metadata
    )
    following = await credits.ListTransactions(
        pb.ListTransactionsRequest(page_size=2, kinds=debits, page_token=page.next_page_token),
        metadata=user.metadata,
    )
    assert [t.idempotency_key for t in following.transactions] == ["d0"]
    found = await fails(
        credits.ListTransactions(
            pb.ListTransactionsRequest(page_size=2, page_token=page.next_page_token),
            metadata=user.metadata,
        )
    )
    assert found.field_violations == ["page_token"]
