"""Arguments out of their type's range are INVALID_ARGUMENT naming the field, never INTERNAL:
Timestamps and Durations that protobuf cannot convert, and page tokens that are forged, edited,
or (signed with the service's own key) carry a position past a bigint or JSON nested too deep.
On the real server over both transports."""

from __future__ import annotations

import base64
import json
import uuid

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, generation_service_pb2_grpc
from credits.v1 import generation_service_pb2 as gpb
from server.auth.page_key import derive
from server.domain import paging
from server.domain.paging import PageTokens
from tests.fixtures.errors import Failure, failure
from tests.fixtures.server import SERVICE, TEST_JWT_SECRET, User, new_user

Stub = credit_service_pb2_grpc.CreditServiceStub
GenerationStub = generation_service_pb2_grpc.GenerationServiceStub
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# The key the test servers sign page tokens with: derived from their JWT secret.
SERVER_TOKENS = PageTokens(derive(TEST_JWT_SECRET.encode()).hex().encode())
TRANSACTIONS = paging.listing("transactions", [], None, None)


async def fails(call: object) -> Failure:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return failure(raised.value)


async def user_with(credits: Stub, amount: int) -> User:
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    await credits.GrantCredits(
        pb.GrantCreditsRequest(user_id=user.user_id, amount=amount, idempotency_key="seed"),
        metadata=SERVICE,
    )
    return user


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        (Timestamp(seconds=2**62), None, "start_time"),
        (Timestamp(seconds=-(2**62)), None, "start_time"),
        (Timestamp(seconds=0, nanos=-1), None, "start_time"),
        (Timestamp(seconds=0, nanos=10**9), None, "start_time"),
        (Timestamp(seconds=253_402_300_800), None, "start_time"),  # year 10000
        (None, Timestamp(seconds=2**62), "end_time"),
        (None, Timestamp(seconds=5, nanos=-7), "end_time"),
        (None, Timestamp(seconds=-62_135_596_801), "end_time"),  # before year 1
    ],
    ids=lambda value: "" if value is None or isinstance(value, str) else str(value).strip(),
)
async def test_a_time_out_of_range_is_invalid_argument(
    credits: Stub, start: Timestamp | None, end: Timestamp | None, field: str
) -> None:
    user = await user_with(credits, 1)
    request = pb.ListTransactionsRequest(start_time=start, end_time=end)
    found = await fails(credits.ListTransactions(request, metadata=user.metadata))
    assert (found.code, found.reason, found.field_violations) == (
        INVALID,
        "INVALID_ARGUMENT",
        [field],
    )


async def test_the_ends_of_the_timestamp_range_are_accepted(credits: Stub) -> None:
    user = await user_with(credits, 1)
    request = pb.ListTransactionsRequest(
        start_time=Timestamp(seconds=-62_135_596_800),
        end_time=Timestamp(seconds=253_402_300_799, nanos=999_999_999),
    )
    listed = await credits.ListTransactions(request, metadata=user.metadata)
    assert [t.idempotency_key for t in listed.transactions] == ["seed"]


@pytest.mark.parametrize(
    "ttl",
    [
        Duration(seconds=2**62),
        Duration(seconds=-(2**62)),
        Duration(seconds=315_576_000_001),
        Duration(seconds=1, nanos=-5),
        Duration(seconds=-1, nanos=5),
        Duration(seconds=0, nanos=10**9),
        Duration(seconds=90_000),  # in the Duration's range, past the 24 hours a hold may last
    ],
    ids=str,
)
async def test_a_ttl_out_of_range_is_invalid_argument(credits: Stub, ttl: Duration) -> None:
    user = await user_with(credits, 10)
    request = pb.ReserveCreditsRequest(amount=1, idempotency_key=uuid.uuid4().hex, ttl=ttl)
    found = await fails(credits.ReserveCredits(request, metadata=user.metadata))
    assert (found.code, found.field_violations) == (INVALID, ["ttl"])
    balance = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert (balance.balance, balance.held) == (10, 0)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _payload(user: User, position: object) -> bytes:
    return json.dumps({"u": user.user_id, "f": TRANSACTIONS, "s": position}).encode()


def bad_tokens(user: User, issued: str) -> dict[str, str]:
    """Tokens the service must refuse, each with why."""
    _, mac = issued.split(".")
    edited = _b64(_payload(user, 2))
    return {
        "unsigned, as tokens were before signing": _b64(_payload(user, 3)),
        "edited position, MAC kept": f"{edited}.{mac}",
        "signed with another key": PageTokens(b"not-the-service-key-0123456789ab").issue(
            user.id, TRANSACTIONS, 3
        ),
        "another user's": SERVER_TOKENS.issue(uuid.uuid4(), TRANSACTIONS, 3),
        "position 2^63": SERVER_TOKENS.seal(_payload(user, 2**63)),
        "position 2^64": SERVER_TOKENS.seal(_payload(user, 2**64)),
        "position 0": SERVER_TOKENS.seal(_payload(user, 0)),
        "position -1": SERVER_TOKENS.seal(_payload(user, -1)),
        "nested JSON": SERVER_TOKENS.seal(b"[" * 200 + b"]" * 200),
        "deeply nested JSON": SERVER_TOKENS.seal(b"[" * 50_000 + b"]" * 50_000),
        "not base64": "%%%." + mac,
        "cut short": issued[:-5],
    }


async def test_a_page_token_the_service_did_not_issue_is_invalid_argument(
    credits: Stub,
) -> None:
    user = await user_with(credits, 10)
    for i in range(3):
        await credits.DebitCredits(
            pb.DebitCreditsRequest(amount=1, idempotency_key=f"d{i}"), metadata=user.metadata
        )
    first = await credits.ListTransactions(
        pb.ListTransactionsRequest(page_size=2), metadata=user.metadata
    )
    issued = first.next_page_token
    # The test's copy of the key is the server's: a token it issues reads as the server's do.
    position = SERVER_TOKENS.read(issued, user.id, TRANSACTIONS)
    assert position is not None
    mine = SERVER_TOKENS.issue(user.id, TRANSACTIONS, position)
    for token in (issued, mine):
        second = await credits.ListTransactions(
            pb.ListTransactionsRequest(page_size=2, page_token=token), metadata=user.metadata
        )
        assert [t.idempotency_key for t in second.transactions] == ["d0", "seed"]
    for why, token in bad_tokens(user, issued).items():
        request = pb.ListTransactionsRequest(page_size=2, page_token=token)
        found = await fails(credits.ListTransactions(request, metadata=user.metadata))
        assert (found.code, found.field_violations) == (INVALID, ["page_token"]), why


async def test_a_generations_page_token_is_signed_too(
    credits: Stub, generations: GenerationStub
) -> None:
    user = await user_with(credits, 10)
    forged = _b64(
        json.dumps({"u": user.user_id, "f": paging.listing("generations"), "s": 2**63}).encode()
    )
    request = gpb.ListGenerationsRequest(page_token=forged)
    found = await fails(generations.ListGenerations(request, metadata=user.metadata))
    assert (found.code, found.field_violations) == (INVALID, ["page_token"])
