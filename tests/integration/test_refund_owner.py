"""RefundCredits from a service that leaves `user_id` empty: the transaction names its user, so
the refund acts on its owner; a user that is named must still be the owner. And a missing
idempotency key is "required", not "1 to 255 printable characters". On both transports."""

from __future__ import annotations

import uuid

import grpc
import grpc.aio
import pytest

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, ledger_pb2
from tests.fixtures.errors import failure
from tests.fixtures.server import SERVICE, User, new_user

Stub = credit_service_pb2_grpc.CreditServiceStub


async def spender(credits: Stub) -> tuple[User, str]:
    """A user granted 100 who spent 40; the debit's transaction id."""
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    await credits.GrantCredits(
        pb.GrantCreditsRequest(user_id=user.user_id, amount=100, idempotency_key="seed"),
        metadata=SERVICE,
    )
    spent = await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=40, idempotency_key="d"), metadata=user.metadata
    )
    return user, spent.transaction.transaction_id


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


async def test_a_service_refunds_by_the_transaction_alone(credits: Stub) -> None:
    user, debit_id = await spender(credits)
    request = pb.RefundCreditsRequest(transaction_id=debit_id, amount=15, idempotency_key="r1")
    refund = await credits.RefundCredits(request, metadata=SERVICE)
    assert (refund.transaction.user_id, refund.transaction.kind) == (
        user.user_id,
        ledger_pb2.TRANSACTION_KIND_REFUND,
    )
    assert (refund.transaction.amount, refund.balance, refund.replayed) == (15, 75, False)
    assert refund.transaction.refunded_transaction_id == debit_id

    # The same key replays, with or without the owner named; the user is on it once.
    again = await credits.RefundCredits(request, metadata=SERVICE)
    named = pb.RefundCreditsRequest(
        user_id=user.user_id, transaction_id=debit_id, amount=15, idempotency_key="r1"
    )
    named_again = await credits.RefundCredits(named, metadata=SERVICE)
    assert (again.replayed, named_again.replayed) == (True, True)
    assert again.transaction.transaction_id == refund.transaction.transaction_id
    assert named_again.transaction.transaction_id == refund.transaction.transaction_id
    balance = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert balance.balance == 75


async def test_an_unknown_transaction_without_a_user_is_not_found(credits: Stub) -> None:
    request = pb.RefundCreditsRequest(transaction_id=str(uuid.uuid4()), idempotency_key="r")
    found = failure(await refused(credits.RefundCredits(request, metadata=SERVICE)))
    assert (found.code, found.reason) == (grpc.StatusCode.NOT_FOUND, "TRANSACTION_NOT_FOUND")


async def test_a_named_user_must_own_the_transaction(credits: Stub) -> None:
    _owner, debit_id = await spender(credits)
    other, _ = await spender(credits)
    request = pb.RefundCreditsRequest(
        user_id=other.user_id, transaction_id=debit_id, idempotency_key="r"
    )
    found = failure(await refused(credits.RefundCredits(request, metadata=SERVICE)))
    assert (found.code, found.reason) == (grpc.StatusCode.NOT_FOUND, "TRANSACTION_NOT_FOUND")
    assert (await credits.GetBalance(pb.GetBalanceRequest(), metadata=other.metadata)).balance == 60


async def test_a_user_still_may_not_refund(credits: Stub) -> None:
    user, debit_id = await spender(credits)
    request = pb.RefundCreditsRequest(transaction_id=debit_id, idempotency_key="r")
    denied = failure(await refused(credits.RefundCredits(request, metadata=user.metadata)))
    assert (denied.code, denied.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


async def test_a_missing_idempotency_key_is_required(credits: Stub) -> None:
    user, debit_id = await spender(credits)
    calls = [
        credits.DebitCredits(pb.DebitCreditsRequest(amount=1), metadata=user.metadata),
        credits.RefundCredits(pb.RefundCreditsRequest(transaction_id=debit_id), metadata=SERVICE),
    ]
    for call in calls:
        error = await refused(call)
        assert failure(error).field_violations == ["idempotency_key"]
        assert error.details() == "idempotency_key: is required"
    too_long = await refused(
        credits.DebitCredits(
            pb.DebitCreditsRequest(amount=1, idempotency_key="k" * 256), metadata=user.metadata
        )
    )
    assert too_long.details() == "idempotency_key: must be 1 to 255 printable characters"
