"""AsyncCreditsClient (and the retry policy of both clients) against a scripted in-process
grpc.aio server: metadata, async token providers, the default deadline, typed errors, and the
service config's retry of UNAVAILABLE resending the same idempotency key."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from credits_client import (
    DEFAULT_TIMEOUT,
    AsyncCreditsClient,
    CreditsClient,
    IdempotencyKeyReused,
    TokenExpired,
    Unavailable,
)
from credits_client._proto import credit_service_pb2 as cpb
from credits_client._proto import (
    credit_service_pb2_grpc,
    generation_pb2,
    generation_service_pb2_grpc,
)
from credits_client._proto import generation_service_pb2 as gpb

from server import errors as server_errors
from server.api import error_table


@dataclass
class Seen:
    method: str
    request: Any
    metadata: dict[str, str]
    time_remaining: float | None


@dataclass
class Script:
    """What the fake server has seen, and how many UNAVAILABLE answers it still owes."""

    seen: list[Seen] = field(default_factory=list)
    unavailable: int = 0
    error: server_errors.CreditsError | None = None


class FakeCredits(credit_service_pb2_grpc.CreditServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def _record(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.script.seen.append(Seen(method, request, metadata, context.time_remaining()))
        if self.script.unavailable:
            self.script.unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        if self.script.error is not None:
            await context.abort_with_status(error_table.to_status(self.script.error))

    async def GetBalance(self, request: Any, context: Any) -> cpb.GetBalanceResponse:
        await self._record("GetBalance", request, context)
        return cpb.GetBalanceResponse(user_id=request.user_id, balance=3)

    async def DebitCredits(self, request: Any, context: Any) -> cpb.DebitCreditsResponse:
        await self._record("DebitCredits", request, context)
        return cpb.DebitCreditsResponse(balance=1)

    async def GrantCredits(self, request: Any, context: Any) -> cpb.GrantCreditsResponse:
        await self._record("GrantCredits", request, context)
        return cpb.GrantCreditsResponse(balance=5)

    async def VoidGrant(self, request: Any, context: Any) -> cpb.VoidGrantResponse:
        await self._record("VoidGrant", request, context)
        return cpb.VoidGrantResponse(balance=0)

    async def ListGrants(self, request: Any, context: Any) -> cpb.ListGrantsResponse:
        await self._record("ListGrants", request, context)
        return cpb.ListGrantsResponse(next_page_token="next")

    async def CheckCredits(self, request: Any, context: Any) -> cpb.CheckCreditsResponse:
        await self._record("CheckCredits", request, context)
        return cpb.CheckCreditsResponse(sufficient=True)


class FakeGenerations(generation_service_pb2_grpc.GenerationServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def WatchGeneration(
        self, request: Any, context: Any
    ) -> AsyncIterator[gpb.WatchGenerationResponse]:
        await FakeCredits._record(self, "WatchGeneration", request, context)  # type: ignore[arg-type]
        for state in (
            generation_pb2.GENERATION_STATE_RUNNING,
            generation_pb2.GENERATION_STATE_FAILED,
        ):
            yield gpb.WatchGenerationResponse(generation=generation_pb2.Generation(state=state))


@pytest.fixture
async def fake() -> AsyncIterator[tuple[str, Script]]:
    script = Script()
    server = grpc.aio.server()
    credit_service_pb2_grpc.add_CreditServiceServicer_to_server(FakeCredits(script), server)
    generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(
        FakeGenerations(script), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", script
    finally:
        await server.stop(None)


async def test_async_token_provider_and_default_deadline(fake: tuple[str, Script]) -> None:
    target, script = fake

    async def fresh_token() -> str:
        return "async-token"

    async with AsyncCreditsClient(target, credentials=fresh_token) as client:
        reply = await client.get_balance(user_id="u1")
        await client.get_balance(user_id="u1", timeout=60)
    assert reply.balance == 3
    assert script.seen[0].metadata["authorization"] == "Bearer async-token"
    assert script.seen[0].time_remaining is not None
    assert 0 < script.seen[0].time_remaining <= DEFAULT_TIMEOUT + 1  # deadlines round up
    assert script.seen[1].time_remaining is not None
    assert DEFAULT_TIMEOUT + 1 < script.seen[1].time_remaining <= 61


async def test_sync_token_provider_in_the_async_client(fake: tuple[str, Script]) -> None:
    target, script = fake
    async with AsyncCreditsClient(target, credentials=lambda: "sync-token") as client:
        await client.get_balance()
    assert script.seen[0].metadata["authorization"] == "Bearer sync-token"


async def test_unavailable_is_retried_with_the_same_idempotency_key(
    fake: tuple[str, Script],
) -> None:
    target, script = fake
    script.unavailable = 2
    async with AsyncCreditsClient(target, credentials="t") as client:
        reply = await client.debit_credits(user_id="u", amount=2)
    assert reply.balance == 1
    keys = [seen.request.idempotency_key for seen in script.seen]
    assert len(keys) == 3
    assert len(set(keys)) == 1
    assert uuid.UUID(keys[0])


async def test_the_sync_client_retries_too(fake: tuple[str, Script]) -> None:
    target, script = fake
    script.unavailable = 1

    def debit() -> cpb.DebitCreditsResponse:
        with CreditsClient(target, credentials="t") as client:
            return client.debit_credits(user_id="u", amount=2, idempotency_key="k1")

    assert (await asyncio.to_thread(debit)).balance == 1
    assert [seen.request.idempotency_key for seen in script.seen] == ["k1", "k1"]


async def test_retries_give_up_after_max_attempts(fake: tuple[str, Script]) -> None:
    target, script = fake
    script.unavailable = 10
    async with AsyncCreditsClient(target, credentials="t", max_attempts=2) as client:
        with pytest.raises(Unavailable):
            await client.debit_credits(user_id="u", amount=2)
    assert len(script.seen) == 2


async def test_max_attempts_1_turns_retries_off(fake: tuple[str, Script]) -> None:
    target, script = fake
    script.unavailable = 1
    async with AsyncCreditsClient(target, credentials="t", max_attempts=1) as client:
        with pytest.raises(Unavailable):
            await client.get_balance()
    assert len(script.seen) == 1


async def test_async_errors_are_typed(fake: tuple[str, Script]) -> None:
    target, script = fake
    script.error = server_errors.TokenExpired()
    async with AsyncCreditsClient(target, credentials="t") as client:
        with pytest.raises(TokenExpired):
            await client.get_balance()
        script.error = server_errors.IdempotencyKeyReused()
        with pytest.raises(IdempotencyKeyReused):
            await client.debit_credits(amount=1, idempotency_key="k")


async def test_async_watch_generation_is_an_async_iterator(fake: tuple[str, Script]) -> None:
    target, script = fake
    async with AsyncCreditsClient(target, credentials="t") as client:
        states = [m.generation.state async for m in client.watch_generation(generation_id="g")]
    assert states == [
        generation_pb2.GENERATION_STATE_RUNNING,
        generation_pb2.GENERATION_STATE_FAILED,
    ]
    assert script.seen[0].time_remaining is None  # streams have no default deadline


async def test_async_watch_errors_are_typed(fake: tuple[str, Script]) -> None:
    target, script = fake
    script.error = server_errors.GenerationNotFound()
    from credits_client import GenerationNotFound

    async with AsyncCreditsClient(target, credentials="t") as client:
        with pytest.raises(GenerationNotFound):
            async for _ in client.watch_generation(generation_id="g"):
                pass


async def test_async_grant_calls_send_their_options(fake: tuple[str, Script]) -> None:
    import datetime

    from credits_client._proto import grant_pb2

    target, script = fake
    ends = datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC)
    async with AsyncCreditsClient(target, credentials="t") as client:
        granted = await client.grant_credits(
            user_id="u", amount=5, expire_time=ends, priority=10, scopes=["model-a"]
        )
        voided = await client.void_grant(grant_id="g", idempotency_key="v")
        listed = await client.list_grants(states=[grant_pb2.GRANT_STATE_EXPIRED])
        checked = await client.check_credits(amount=1, scope="model-a")
        script.error = server_errors.GrantNotActive(state="voided")
        from credits_client import GrantNotActive

        with pytest.raises(GrantNotActive) as refused:
            await client.void_grant(grant_id="g")
    assert (granted.balance, voided.balance, listed.next_page_token) == (5, 0, "next")
    assert checked.sufficient
    assert refused.value.state == "voided"
    grant, void, listing, check = (seen.request for seen in script.seen[:4])
    assert grant.expire_time.ToDatetime(datetime.UTC) == ends
    assert (grant.priority, list(grant.scopes)) == (10, ["model-a"])
    assert (void.grant_id, void.idempotency_key) == ("g", "v")
    assert list(listing.states) == [grant_pb2.GRANT_STATE_EXPIRED]
    assert check.scope == "model-a"
