"""A database that stops answering (every PostgreSQL process frozen with SIGSTOP), over both
transports: health turns NOT_SERVING within a few seconds and SERVING again once it answers;
meanwhile a call fails UNAVAILABLE / BACKEND_UNAVAILABLE with a RetryInfo after the configured
database timeout, or before its own deadline when that is nearer, never DEADLINE_EXCEEDED."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import grpc
import grpc.aio
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from server import app as application
from server.db import embedded, migrate
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.errors import failure
from tests.fixtures.server import TEST_JWT_SECRET, new_user, settings_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DB_TIMEOUT = 2.0
# The watch probes every 2 s with a 1 s timeout: health follows within about 3 s.
HEALTH_WITHIN = 8.0


@pytest.fixture
async def own_database() -> AsyncIterator[embedded.EmbeddedPostgres]:
    """A migrated PostgreSQL of this test's own, which it may freeze."""
    data_dir = Path(tempfile.mkdtemp(prefix="credits-outage-"))
    database = await embedded.start(data_dir)
    try:
        await migrate.migrate(database.uri)
        yield database
    finally:
        await database.astop()
        shutil.rmtree(data_dir, ignore_errors=True)


@contextmanager
def frozen(database: embedded.EmbeddedPostgres) -> Iterator[None]:
    """Every process of the server stopped (SIGSTOP: sockets open, nothing answers), and
    continued (SIGCONT) at the end whatever happens."""
    assert database.pid is not None
    postmaster = psutil.Process(database.pid)
    processes = [postmaster, *postmaster.children(recursive=True)]
    for process in processes:
        os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for process in processes:
            with suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)


@pytest.fixture(params=["postgres", "supabase"])
async def app(
    request: pytest.FixtureRequest, own_database: embedded.EmbeddedPostgres
) -> AsyncIterator[application.Application]:
    """The service over the test's own database: directly, or through a Supabase stand-in."""
    fake = await FakeSupabase.start(own_database.uri, jwt_secret=TEST_JWT_SECRET)
    settings = settings_for(request.param, own_database.uri, fake)
    started = await application.start(dataclasses.replace(settings, db_timeout_seconds=DB_TIMEOUT))
    try:
        yield started
    finally:
        await started.stop(grace=1)
        await fake.stop()


async def health_becomes(channel: grpc.aio.Channel, status: int, within: float) -> float:
    """Seconds until health says `status` (every service); fails after `within`."""
    health = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()
    while time.monotonic() - started < within:
        answers = [
            (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)).status
            for service in ("", "credits.v1.CreditService", "credits.v1.GenerationService")
        ]
        if answers == [status] * 3:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"health not {status} within {within} s")


async def unavailable_after(
    stub: credit_service_pb2_grpc.CreditServiceStub, metadata: object, deadline: float
) -> float:
    """Seconds until GetBalance (with `deadline`) failed, as UNAVAILABLE / BACKEND_UNAVAILABLE
    with a RetryInfo."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetBalance(pb.GetBalanceRequest(), metadata=metadata, timeout=deadline)
    took = time.monotonic() - started
    found = failure(raised.value)
    assert (found.code, found.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"), (
        found,
        took,
    )
    assert found.retry_delay_seconds is not None
    assert found.retry_delay_seconds > 0
    return took


async def test_a_frozen_database_turns_health_not_serving_and_calls_unavailable_in_time(
    app: application.Application, own_database: embedded.EmbeddedPostgres
) -> None:
    user = new_user()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata, timeout=10)
        await health_becomes(channel, SERVING, 1)

        with frozen(own_database):
            # The configured database timeout, well within the caller's 10 s.
            took = await unavailable_after(stub, user.metadata, deadline=10)
            assert DB_TIMEOUT - 0.3 < took < DB_TIMEOUT + 1.5, took
            # A nearer deadline of the caller's own: still UNAVAILABLE, and before it.
            took = await unavailable_after(stub, user.metadata, deadline=1)
            assert took < 1.0, took
            await health_becomes(channel, NOT_SERVING, HEALTH_WITHIN)

        await health_becomes(channel, SERVING, HEALTH_WITHIN)
        balance = await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata, timeout=10)
        assert balance.user_id == user.user_id
