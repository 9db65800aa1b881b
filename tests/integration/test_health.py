"""The health service of a real server: Check and Watch per service, and a shutdown that tells
every watcher NOT_SERVING and ends its stream instead of waiting out the grace period."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import app as application
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.server import settings_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
CREDIT_SERVICE = "credits.v1.CreditService"


async def test_check_reports_each_service_and_refuses_an_unknown_one(
    channel: grpc.aio.Channel,
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", CREDIT_SERVICE, "credits.v1.GenerationService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watching_an_unknown_service_reports_it_unknown(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"))
    first = await watch.read()
    assert isinstance(first, health_pb2.HealthCheckResponse)
    assert first.status == SERVICE_UNKNOWN
    watch.cancel()


async def test_shutdown_tells_watchers_not_serving_and_ends_their_streams(
    database_url: str, supabase: FakeSupabase
) -> None:
    app = await application.start(settings_for("postgres", database_url, supabase))
    grace = 30.0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [
            health.Watch(health_pb2.HealthCheckRequest(service=service))
            for service in ("", CREDIT_SERVICE)
        ]
        for watch in watches:
            first = await watch.read()
            assert isinstance(first, health_pb2.HealthCheckResponse)
            assert first.status == SERVING
        started = time.monotonic()
        stopping = asyncio.create_task(app.stop(grace=grace))
        for watch in watches:
            told = await watch.read()
            assert isinstance(told, health_pb2.HealthCheckResponse)
            assert told.status == NOT_SERVING
            assert await watch.read() is grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK
        await stopping
    # The open watches did not hold the server for its grace period.
    assert time.monotonic() - started < grace / 3
