"""The profile keeper, behind the call interceptor, makes sure of a user's profile as their call
ends, on a real server: before the status goes out, after failures of the call itself too, but
not while the database is down, and never for a service or a rejected caller."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from server import errors
from server.auth.principal import UserPrincipal
from server.auth.tokens import mint_service_token, mint_user_token
from server.auth.verifier import TokenVerifier
from server.credit.profiles import ProfileKeeper
from server.interceptors import CallInterceptor
from server.serving import GuardedServer

SECRET = "profile-settling-test-secret-" + "x" * 40
# What GetBalance does, by the user_id asked for.
OUTCOMES: dict[str, BaseException | None] = {
    "": None,
    "denied": errors.PermissionDenied(),
    "down": errors.BackendUnavailable(),
}


class Provisioned(list[uuid.UUID]):
    """A fake profile store: the users whose profile was made sure of, in order."""

    async def provision(self, principal: UserPrincipal) -> None:
        self.append(principal.user_id)


class ScriptedCredits(credit_service_pb2_grpc.CreditServiceServicer):
    async def GetBalance(
        self, request: pb.GetBalanceRequest, context: Any
    ) -> pb.GetBalanceResponse:
        outcome = OUTCOMES[request.user_id]
        if outcome is not None:
            raise outcome
        return pb.GetBalanceResponse()


@pytest_asyncio.fixture(loop_scope="session")
async def served() -> AsyncIterator[tuple[credit_service_pb2_grpc.CreditServiceStub, Provisioned]]:
    provisioned = Provisioned()
    server = GuardedServer(
        grpc.aio.server(),
        CallInterceptor(TokenVerifier(hs256_secret=SECRET), ProfileKeeper(provisioned)),
    )
    credit_service_pb2_grpc.add_CreditServiceServicer_to_server(ScriptedCredits(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield credit_service_pb2_grpc.CreditServiceStub(channel), provisioned
    finally:
        await server.stop(None)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize("asked", ["", "denied"])
async def test_a_users_call_has_their_profile_made_sure_of_before_its_answer(
    served: tuple[credit_service_pb2_grpc.CreditServiceStub, Provisioned], asked: str
) -> None:
    stub, provisioned = served
    user = uuid.uuid4()
    call = stub.GetBalance(
        pb.GetBalanceRequest(user_id=asked), metadata=bearer(mint_user_token(SECRET, user))
    )
    try:
        await call
    except grpc.aio.AioRpcError:
        assert asked == "denied"
    assert provisioned[-1:] == [user]  # already, as the answer arrived


async def test_no_second_wait_for_a_database_that_is_down(
    served: tuple[credit_service_pb2_grpc.CreditServiceStub, Provisioned],
) -> None:
    stub, provisioned = served
    user = uuid.uuid4()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetBalance(
            pb.GetBalanceRequest(user_id="down"), metadata=bearer(mint_user_token(SECRET, user))
        )
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert user not in provisioned


async def test_services_and_rejected_callers_have_no_profile_to_make(
    served: tuple[credit_service_pb2_grpc.CreditServiceStub, Provisioned],
) -> None:
    stub, provisioned = served
    before = len(provisioned)
    await stub.GetBalance(pb.GetBalanceRequest(), metadata=bearer(mint_service_token(SECRET)))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetBalance(pb.GetBalanceRequest(), metadata=bearer("not-a-token"))
    assert len(provisioned) == before
