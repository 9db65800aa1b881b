"""One scenario (grant, debit, replay, overdraft, reserve, capture, a generation and its watch,
a spending limit and its refusal, usage, the export's stream, refusals) run over gRPC and over
Connect against the same server: the same results, once the ids and times each run made are
normalised, and the same error codes and reasons."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

import grpc
import grpc.aio
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from credits.v1 import credit_service_pb2 as cpb
from credits.v1 import generation_service_pb2 as gpb
from credits.v1 import usage_pb2
from server import app as application
from tests.fixtures.connect import Connect, ConnectFailure
from tests.fixtures.errors import failure
from tests.fixtures.server import SERVICE, bearer, new_user
from tests.fixtures.transcript import Normaliser

M = TypeVar("M", bound=Message)
CREDITS = "credits.v1.CreditService"
GENERATIONS = "credits.v1.GenerationService"
SERVICE_TOKEN = dict(SERVICE)["authorization"].removeprefix("Bearer ")


@dataclass(frozen=True)
class Refused(Exception):
    """A call that failed: its gRPC status code name and ErrorInfo reason."""

    code: str
    reason: str


class Caller(Protocol):
    async def unary(
        self, service: str, method: str, request: Message, reply: type[M], token: str
    ) -> M: ...

    def stream(
        self, service: str, method: str, request: Message, reply: type[M], token: str
    ) -> AsyncIterator[M]: ...


class OverGrpc:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    async def unary(
        self, service: str, method: str, request: Message, reply: type[M], token: str
    ) -> M:
        call = self._channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=reply.FromString,
        )
        try:
            response: M = await call(request, metadata=bearer(token))
        except grpc.aio.AioRpcError as error:
            raise Refused(error.code().name, failure(error).reason) from None
        return response

    async def stream(
        self, service: str, method: str, request: Message, reply: type[M], token: str
    ) -> AsyncIterator[M]:
        call = self._channel.unary_stream(
            f"/{service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=reply.FromString,
        )
        try:
            async for response in call(request, metadata=bearer(token)):
                yield response
        except grpc.aio.AioRpcError as error:
            raise Refused(error.code().name, failure(error).reason) from None


class OverConnect:
    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    async def unary(
        self, service: str, method: str, request: Message, reply: type[M], token: str
    ) -> M:
        try:
            return await self._connect.unary(f"/{service}/{method}", request, reply, token)
        except ConnectFailure as error:
            raise Refused(_grpc_name(error.code), error.reason) from None

    async def stream(
        self, service: str, method: str, request: Message, reply: type[M], token: str
    ) -> AsyncIterator[M]:
        try:
            async for response in self._connect.stream(
                f"/{service}/{method}", request, reply, token
            ):
                yield response
        except ConnectFailure as error:
            raise Refused(_grpc_name(error.code), error.reason) from None


def _grpc_name(connect_code: str) -> str:
    return "CANCELLED" if connect_code == "canceled" else connect_code.upper()


async def scenario(caller: Caller) -> list[object]:
    """Every step's outcome: the response as a dict, or the refusal's code and reason."""
    user = new_user()
    me = dict(user.metadata)["authorization"].removeprefix("Bearer ")
    outcomes: list[object] = []

    async def step(
        service: str, method: str, request: Message, reply: type[M], token: str = me
    ) -> M | None:
        try:
            response = await caller.unary(service, method, request, reply, token)
        except Refused as refused:
            outcomes.append({method: [refused.code, refused.reason]})
            return None
        outcomes.append({method: json_format.MessageToDict(response)})
        return response

    await step(CREDITS, "GetBalance", cpb.GetBalanceRequest(), cpb.GetBalanceResponse)
    grant = cpb.GrantCreditsRequest(user_id=user.user_id, amount=100, idempotency_key="g1")
    await step(CREDITS, "GrantCredits", grant, cpb.GrantCreditsResponse, SERVICE_TOKEN)
    debit = cpb.DebitCreditsRequest(amount=30, idempotency_key="d1", description="export")
    await step(CREDITS, "DebitCredits", debit, cpb.DebitCreditsResponse)
    await step(CREDITS, "DebitCredits", debit, cpb.DebitCreditsResponse)  # the replay
    overdraft = cpb.DebitCreditsRequest(amount=1000, idempotency_key="d2")
    await step(CREDITS, "DebitCredits", overdraft, cpb.DebitCreditsResponse)
    reserve = cpb.ReserveCreditsRequest(amount=20, idempotency_key="h1")
    reserved = await step(CREDITS, "ReserveCredits", reserve, cpb.ReserveCreditsResponse)
    assert reserved is not None
    hold_id = reserved.hold.hold_id
    capture = cpb.CaptureCreditsRequest(hold_id=hold_id, amount=15, idempotency_key="c1")
    await step(CREDITS, "CaptureCredits", capture, cpb.CaptureCreditsResponse)
    release = cpb.ReleaseCreditsRequest(hold_id=hold_id)
    await step(CREDITS, "ReleaseCredits", release, cpb.ReleaseCreditsResponse)

    create = gpb.CreateGenerationRequest(model="test-image", prompt="a lighthouse", request_id="q1")
    created = await step(GENERATIONS, "CreateGeneration", create, gpb.CreateGenerationResponse)
    assert created is not None
    generation_id = created.generation.generation_id
    cancel = gpb.CancelGenerationRequest(generation_id=generation_id)
    await step(GENERATIONS, "CancelGeneration", cancel, gpb.CancelGenerationResponse)
    await step(GENERATIONS, "CancelGeneration", cancel, gpb.CancelGenerationResponse)
    watch = gpb.WatchGenerationRequest(generation_id=generation_id)
    watched = [
        json_format.MessageToDict(update)
        async for update in caller.stream(
            GENERATIONS, "WatchGeneration", watch, gpb.WatchGenerationResponse, me
        )
    ]
    outcomes.append({"WatchGeneration": watched})
    try:
        unknown = gpb.WatchGenerationRequest(generation_id=str(uuid.uuid4()))
        async for _ in caller.stream(
            GENERATIONS, "WatchGeneration", unknown, gpb.WatchGenerationResponse, me
        ):
            pass
    except Refused as refused:
        outcomes.append({"WatchGeneration": [refused.code, refused.reason]})

    await step(CREDITS, "GetBalance", cpb.GetBalanceRequest(), cpb.GetBalanceResponse)
    await step(
        CREDITS, "ListTransactions", cpb.ListTransactionsRequest(), cpb.ListTransactionsResponse
    )
    day = usage_pb2.SPEND_PERIOD_DAY
    limit = cpb.SetSpendLimitRequest(user_id=user.user_id, period=day, limit=60)
    await step(CREDITS, "SetSpendLimit", limit, cpb.SetSpendLimitResponse, SERVICE_TOKEN)
    await step(CREDITS, "GetSpendLimits", cpb.GetSpendLimitsRequest(), cpb.GetSpendLimitsResponse)
    over = cpb.DebitCreditsRequest(amount=50, idempotency_key="d4")  # 45 spent today: over 60
    await step(CREDITS, "DebitCredits", over, cpb.DebitCreditsResponse)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    usage = cpb.GetUsageRequest(
        granularity=usage_pb2.USAGE_GRANULARITY_DAY, group_by=usage_pb2.USAGE_GROUP_BY_KIND
    )
    usage.start_time.FromDatetime(today)
    usage.end_time.FromDatetime(today + timedelta(days=1))
    await step(CREDITS, "GetUsage", usage, cpb.GetUsageResponse)
    export = cpb.ExportTransactionsRequest(user_id=user.user_id)
    exported = [
        json_format.MessageToDict(batch)
        async for batch in caller.stream(
            CREDITS, "ExportTransactions", export, cpb.ExportTransactionsResponse, SERVICE_TOKEN
        )
    ]
    outcomes.append({"ExportTransactions": exported})
    self_grant = cpb.GrantCreditsRequest(user_id=user.user_id, amount=5, idempotency_key="g2")
    await step(CREDITS, "GrantCredits", self_grant, cpb.GrantCreditsResponse)
    zero = cpb.DebitCreditsRequest(amount=0, idempotency_key="d3")
    await step(CREDITS, "DebitCredits", zero, cpb.DebitCreditsResponse)
    other = cpb.GetBalanceRequest(user_id=str(uuid.uuid4()))
    await step(CREDITS, "GetBalance", other, cpb.GetBalanceResponse)
    await step(CREDITS, "GetBalance", cpb.GetBalanceRequest(), cpb.GetBalanceResponse, "forged")
    return outcomes


def normalised(outcomes: list[object]) -> str:
    """The outcomes as JSON, each run's ids and times replaced in order of appearance."""
    return Normaliser(set())(json.dumps(outcomes, indent=1, sort_keys=True))


async def test_the_scenario_has_the_same_outcome_over_grpc_and_connect(
    server: application.Application, channel: grpc.aio.Channel
) -> None:
    over_grpc = normalised(await scenario(OverGrpc(channel)))
    async with httpx.AsyncClient(timeout=20) as http:
        over_connect = normalised(
            await scenario(OverConnect(Connect(http, f"http://127.0.0.1:{server.http_port}")))
        )
    assert over_connect == over_grpc
    refusals = [
        value
        for outcome in json.loads(over_grpc)
        for value in outcome.values()
        if isinstance(value, list) and value and isinstance(value[0], str)
    ]
    # The refusals the scenario means to make, by code and reason.
    assert refusals == [
        ["FAILED_PRECONDITION", "INSUFFICIENT_CREDITS"],
        ["FAILED_PRECONDITION", "HOLD_NOT_PENDING"],
        ["FAILED_PRECONDITION", "GENERATION_NOT_CANCELLABLE"],
        ["NOT_FOUND", "GENERATION_NOT_FOUND"],
        ["FAILED_PRECONDITION", "SPEND_LIMIT_EXCEEDED"],
        ["PERMISSION_DENIED", "PERMISSION_DENIED"],
        ["INVALID_ARGUMENT", "INVALID_ARGUMENT"],
        ["PERMISSION_DENIED", "PERMISSION_DENIED"],
        ["UNAUTHENTICATED", "TOKEN_INVALID"],
    ]
    replay = [o["DebitCredits"] for o in json.loads(over_grpc) if "DebitCredits" in o][1]
    assert replay["replayed"] is True


@pytest.mark.parametrize("codec", ["proto"])
async def test_the_scenario_over_binary_connect_matches_grpc_too(
    server: application.Application, channel: grpc.aio.Channel, codec: str
) -> None:
    over_grpc = normalised(await scenario(OverGrpc(channel)))
    async with httpx.AsyncClient(timeout=20) as http:
        connect = Connect(http, f"http://127.0.0.1:{server.http_port}", codec)
        assert normalised(await scenario(OverConnect(connect))) == over_grpc
