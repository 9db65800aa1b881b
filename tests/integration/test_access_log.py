"""One JSON access-log line per RPC, and the request id a caller can quote."""

from __future__ import annotations

import json
import logging
import os
import re

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from server.observability.logs import JsonFormatter
from tests.fixtures.errors import failure
from tests.fixtures.server import bearer, new_user

Stub = credit_service_pb2_grpc.CreditServiceStub
GET_BALANCE = "/credits.v1.CreditService/GetBalance"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """The access-log lines, as the JSON formatter writes them."""
    formatter = JsonFormatter()
    return [
        json.loads(formatter.format(record))
        for record in caplog.records
        if record.name == "credits.access"
    ]


async def test_a_call_is_logged_once_with_the_callers_request_id(
    credits: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="credits.access")
    user = new_user()
    call = credits.GetBalance(
        pb.GetBalanceRequest(), metadata=(*user.metadata, ("x-request-id", "trace-42"))
    )
    await call
    assert ("x-request-id", "trace-42") in tuple(await call.trailing_metadata())
    [line] = [entry for entry in access_lines(caplog) if entry["request_id"] == "trace-42"]
    assert (line["method"], line["code"], line["principal"], line["user_id"]) == (
        GET_BALANCE,
        "OK",
        "user",
        user.user_id,
    )
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= 0
    assert line["level"] == "info"
    assert line["pid"] == os.getpid()


async def test_a_request_id_is_made_when_the_caller_sends_none(
    credits: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="credits.access")
    call = credits.GetBalance(pb.GetBalanceRequest(), metadata=new_user().metadata)
    await call
    made = dict(await call.trailing_metadata())["x-request-id"]
    assert isinstance(made, str)
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert [entry["request_id"] for entry in access_lines(caplog)].count(made) == 1


async def test_a_failure_is_logged_with_its_code_and_reason(
    credits: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="credits.access")
    user = new_user()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.DebitCredits(
            pb.DebitCreditsRequest(amount=5, idempotency_key="k"),
            metadata=(*user.metadata, ("x-request-id", "trace-43")),
        )
    assert failure(raised.value).reason == "INSUFFICIENT_CREDITS"
    assert ("x-request-id", "trace-43") in tuple(raised.value.trailing_metadata() or ())
    [line] = [entry for entry in access_lines(caplog) if entry["request_id"] == "trace-43"]
    assert (line["code"], line["reason"], line["user_id"]) == (
        "FAILED_PRECONDITION",
        "INSUFFICIENT_CREDITS",
        user.user_id,
    )


async def test_a_rejected_token_is_logged_without_the_token(
    credits: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXRoYXQtZG9lcy1ub3QtbWF0Y2g"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.GetBalance(
            pb.GetBalanceRequest(), metadata=(*bearer(forged), ("x-request-id", "trace-44"))
        )
    assert failure(raised.value).reason == "TOKEN_INVALID"
    assert ("x-request-id", "trace-44") in tuple(raised.value.trailing_metadata() or ())
    [line] = [entry for entry in access_lines(caplog) if entry["request_id"] == "trace-44"]
    assert (line["code"], line["reason"], line["principal"]) == (
        "UNAUTHENTICATED",
        "TOKEN_INVALID",
        "none",
    )
    formatter = JsonFormatter()
    assert all(forged not in formatter.format(record) for record in caplog.records)


async def test_health_checks_are_not_logged(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="credits.access")
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert access_lines(caplog) == []
