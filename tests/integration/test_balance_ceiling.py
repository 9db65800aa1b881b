"""A balance never passes the largest bigint: a grant or refund that would take it past 2^63 - 1
is FAILED_PRECONDITION / BALANCE_LIMIT_EXCEEDED and writes nothing (it was INTERNAL, "bigint
out of range"), on the real server over both transports."""

from __future__ import annotations

import grpc

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from tests.fixtures.errors import failure
from tests.fixtures.server import SERVICE, User, new_user

Stub = credit_service_pb2_grpc.CreditServiceStub
CEILING = 2**63 - 1


async def user_with(credits: Stub, amount: int) -> User:
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    await credits.GrantCredits(
        pb.GrantCreditsRequest(user_id=user.user_id, amount=amount, idempotency_key="seed"),
        metadata=SERVICE,
    )
    return user


def grant_request(user: User, amount: int, key: str) -> pb.GrantCreditsRequest:
    return pb.GrantCreditsRequest(user_id=user.user_id, amount=amount, idempotency_key=key)


async def state(credits: Stub, user: User) -> tuple[int, int]:
    """The user's balance and the length of their ledger."""
    balance = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    listed = await credits.ListTransactions(
        pb.ListTransactionsRequest(page_size=500), metadata=user.metadata
    )
    return balance.balance, len(listed.transactions)


async def refused(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        found = failure(error)
        return found.code, found.reason
    raise AssertionError("the call succeeded")


async def test_a_grant_up_to_the_ceiling_is_taken_and_one_past_it_refused(credits: Stub) -> None:
    user = await user_with(credits, CEILING - 10)
    full = await credits.GrantCredits(grant_request(user, 10, "to-the-top"), metadata=SERVICE)
    assert full.balance == CEILING
    assert await refused(
        credits.GrantCredits(grant_request(user, 1, "one-more"), metadata=SERVICE)
    ) == (grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_LIMIT_EXCEEDED")
    largest = grant_request(user, CEILING, "the-largest")
    assert await refused(credits.GrantCredits(largest, metadata=SERVICE)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "BALANCE_LIMIT_EXCEEDED",
    )
    assert await state(credits, user) == (CEILING, 2)
    # A replay of the grant that reached the ceiling still answers with its result.
    again = await credits.GrantCredits(grant_request(user, 10, "to-the-top"), metadata=SERVICE)
    assert (again.replayed, again.balance) == (True, CEILING)


async def test_a_refund_past_the_ceiling_is_refused(credits: Stub) -> None:
    user = await user_with(credits, CEILING)
    debit = await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=10, idempotency_key="spend"), metadata=user.metadata
    )
    await credits.GrantCredits(grant_request(user, 10, "top-up"), metadata=SERVICE)
    refund = pb.RefundCreditsRequest(
        user_id=user.user_id,
        transaction_id=debit.transaction.transaction_id,
        idempotency_key="give-back",
    )
    assert await refused(credits.RefundCredits(refund, metadata=SERVICE)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "BALANCE_LIMIT_EXCEEDED",
    )
    assert await state(credits, user) == (CEILING, 3)
    # Once there is room, the same refund goes through.
    await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=10, idempotency_key="spend-again"), metadata=user.metadata
    )
    done = await credits.RefundCredits(refund, metadata=SERVICE)
    assert (done.replayed, done.balance) == (False, CEILING)
