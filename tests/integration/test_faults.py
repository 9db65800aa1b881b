"""Faults, bounded in time: the database stops under load and comes back."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import grpc.aio
import pytest

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from server import app as application
from server.db import embedded
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.errors import failure
from tests.fixtures.server import SERVICE, new_user, settings_for

Stub = credit_service_pb2_grpc.CreditServiceStub


PG_CTL = embedded.bin_dir() / "pg_ctl"


def _postmaster_pid(database: embedded.EmbeddedPostgres) -> int | None:
    try:
        return int((database.pgdata / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


async def stop(database: embedded.EmbeddedPostgres) -> None:
    """A fast shutdown of the server (SIGINT to the postmaster), waited for."""
    pid = _postmaster_pid(database)
    if pid is None:
        return
    os.kill(pid, signal.SIGINT)
    for _ in range(400):
        if _postmaster_pid(database) is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the database did not stop within 20 s")


async def start_again(database: embedded.EmbeddedPostgres) -> None:
    """The same server on the same socket, started as pgserver starts it. As root it runs as
    pgserver's user, switched by runuser (no Python may run between fork and exec here)."""
    socket_dir = parse_qs(urlsplit(database.uri).query)["host"][0]
    command = [str(PG_CTL), "-D", str(database.pgdata), "-w", "-o", '-h ""']
    command += ["-o", f"-k {socket_dir}", "-l", str(database.pgdata / "log"), "start"]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "pgserver", "--", *command]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, errors = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, errors.decode()


@pytest.fixture
async def own_database() -> AsyncIterator[embedded.EmbeddedPostgres]:
    """A PostgreSQL of this test's own, which it may stop and start again."""
    data_dir = Path(tempfile.mkdtemp(prefix="credits-fault-"))
    database = await embedded.start(data_dir)
    try:
        yield database
    finally:
        # A restarted server is not the process pgserver knows: stop it by its pid file first.
        await stop(database)
        await database.astop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def answers(stub: Stub, metadata: tuple[tuple[str, str], ...]) -> bool:
    """Whether the service answers again; only UNAVAILABLE may say it does not yet."""
    try:
        await stub.GetBalance(pb.GetBalanceRequest(), metadata=metadata)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False
    return True


async def test_a_stopped_database_is_unavailable_and_recovery_needs_no_restart(
    own_database: embedded.EmbeddedPostgres, supabase: FakeSupabase
) -> None:
    settings = settings_for("postgres", own_database.uri, supabase)
    app = await application.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = Stub(channel)
            user = new_user()
            await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
            await stub.GrantCredits(
                pb.GrantCreditsRequest(user_id=user.user_id, amount=1000, idempotency_key="seed"),
                metadata=SERVICE,
            )
            keys = [f"order-{i}" for i in range(40)]

            async def debit(key: str) -> pb.DebitCreditsResponse:
                reply: pb.DebitCreditsResponse = await stub.DebitCredits(
                    pb.DebitCreditsRequest(amount=1, idempotency_key=key),
                    metadata=user.metadata,
                    timeout=10,
                )
                return reply

            # Under load, the database goes away.
            first = [asyncio.create_task(debit(key)) for key in keys[:20]]
            await stop(own_database)
            outcomes = await asyncio.gather(*first, return_exceptions=True)
            during = await asyncio.gather(
                *(debit(key) for key in keys[20:]), return_exceptions=True
            )
            unavailable = [o for o in (*outcomes, *during) if isinstance(o, grpc.aio.AioRpcError)]
            assert unavailable, "some debits met the stopped database"
            for error in unavailable:
                found = failure(error)
                assert (found.code, found.reason) == (
                    grpc.StatusCode.UNAVAILABLE,
                    "BACKEND_UNAVAILABLE",
                )
                assert found.retry_delay_seconds is not None
                assert found.retry_delay_seconds > 0

            # It comes back; the same server answers again, and clients retry their keys.
            await start_again(own_database)
            for _ in range(100):
                if await answers(stub, user.metadata):
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("no recovery within 20 s of the database's return")
            retried = await asyncio.gather(*(debit(key) for key in keys))
            assert {r.transaction.idempotency_key for r in retried} == set(keys)
            balance = await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    finally:
        await app.stop(grace=1)

    assert balance.balance == 1000 - len(keys), "every debit exactly once"
    conn = await asyncpg.connect(own_database.uri)
    try:
        rows = await conn.fetch(
            "select idempotency_key from credit_transactions where user_id = $1 and kind = 'debit'",
            uuid.UUID(user.user_id),
        )
    finally:
        await conn.close()
    assert sorted(r["idempotency_key"] for r in rows) == sorted(keys), "none lost, none doubled"
