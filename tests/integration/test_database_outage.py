"""A database that stops answering (every PostgreSQL process frozen with SIGSTOP), over both
transports: a call fails UNAVAILABLE / BACKEND_UNAVAILABLE with a RetryInfo after the configured
database timeout, or before its own deadline when that is nearer, never DEADLINE_EXCEEDED."""

from __future__ import annotations

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

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from server import app as application
from server.db import embedded, migrate
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.errors import failure
from tests.fixtures.server import TEST_JWT_SECRET, new_user, settings_for

DB_TIMEOUT = 2.0


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


async def test_calls_to_a_frozen_database_are_unavailable_in_time(
    app: application.Application, own_database: embedded.EmbeddedPostgres
) -> None:
    user = new_user()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata, timeout=10)

        with frozen(own_database):
            # The configured database timeout, well within the caller's 10 s.
            took = await unavailable_after(stub, user.metadata, deadline=10)
            assert DB_TIMEOUT - 0.3 < took < DB_TIMEOUT + 1.5, took
            # A nearer deadline of the caller's own: still UNAVAILABLE, and before it.
            took = await unavailable_after(stub, user.metadata, deadline=1)
            assert took < 1.0, took

        balance = await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata, timeout=10)
        assert balance.user_id == user.user_id
