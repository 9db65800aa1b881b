"""Large tokens on real channels: every token up to 32 KiB is accepted, every time, and a larger
one is refused with a reason (UNAUTHENTICATED / TOKEN_INVALID), by the real server, through a
bare grpc.aio channel and through the Python client.

gRPC core's default metadata limits refused tokens of 8 to 16 KiB at random (RESOURCE_EXHAUSTED,
no ErrorInfo) and every larger one: hence 20 tries of each size.
"""

from __future__ import annotations

import time
import uuid

import grpc
import grpc.aio
import jwt
import pytest
from credits_client import AsyncCreditsClient, TokenInvalid

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from server import app as application
from tests.fixtures.errors import failure
from tests.fixtures.server import TEST_JWT_SECRET, bearer

KIB = 1024
TRIES = 20


def token_of(size: int, user_id: uuid.UUID) -> str:
    """A valid user token of exactly `size` characters (padded in user_metadata)."""

    def minted(pad: int) -> str:
        now = int(time.time())
        claims = {
            "sub": str(user_id),
            "aud": "authenticated",
            "role": "authenticated",
            "iat": now,
            "exp": now + 3600,
            "user_metadata": {"pad": "x" * pad},
        }
        return jwt.encode(claims, TEST_JWT_SECRET, algorithm="HS256")

    low, high = 0, size
    while low < high:  # the longest padding that fits `size`
        middle = (low + high + 1) // 2
        if len(minted(middle)) <= size:
            low = middle
        else:
            high = middle - 1
    token = minted(low)
    # base64 grows in steps of 4 characters: the token is within 3 of `size`.
    assert size - 4 < len(token) <= size, (size, len(token))
    return token


@pytest.mark.parametrize("kib", [9, 12, 16, 31])
async def test_a_token_up_to_32_kib_is_accepted_every_time(
    server: application.Application, kib: int
) -> None:
    user_id = uuid.uuid4()
    token = token_of(kib * KIB, user_id)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        for _ in range(TRIES):
            reply = await stub.GetBalance(pb.GetBalanceRequest(), metadata=bearer(token))
            assert reply.user_id == str(user_id)
    async with AsyncCreditsClient(
        f"127.0.0.1:{server.port}", credentials=token, max_attempts=1
    ) as client:
        for _ in range(TRIES):
            balance = await client.get_balance()
            assert balance.user_id == str(user_id)


async def test_a_token_above_32_kib_is_token_invalid_saying_why(
    server: application.Application,
) -> None:
    token = token_of(40 * KIB, uuid.uuid4())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        for _ in range(TRIES):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetBalance(pb.GetBalanceRequest(), metadata=bearer(token))
            found = failure(caught.value)
            assert (found.code, found.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
            assert caught.value.details() == "the token is larger than 32 KiB"
    async with AsyncCreditsClient(
        f"127.0.0.1:{server.port}", credentials=token, max_attempts=1
    ) as client:
        with pytest.raises(TokenInvalid) as refused:
            await client.get_balance()
        assert refused.value.message == "the token is larger than 32 KiB"
