"""Generation workers on the real server and database: failures, retries, cancellation, expired
reservations, a worker killed mid-job, and many jobs across several workers. Whatever happens,
a user is charged exactly once for a generation that succeeded and never for one that did not.

In-process workers run over both transports; the killed `credits worker` process talks to
PostgreSQL directly, so that test runs on the postgres transport only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from credits.v1 import generation_pb2
from credits.v1 import generation_service_pb2 as gpb
from server import app as application
from server.generation.worker import Worker, load_providers
from server.repository.generations import GenerationRepository
from tests.fixtures.process import CREDITS, embedded_env
from tests.fixtures.server import TEST_JWT_SECRET, TEST_MODELS, User
from tests.fixtures.workers import (
    CANCELLED,
    COST,
    FAILED,
    FAST,
    FINAL,
    RUNNING,
    SUCCEEDED,
    CreditStub,
    GenerationStub,
    balance,
    cancel_unfinished,
    captures,
    create,
    funded,
    get,
    hold_state,
    owner_connection,
    recording_providers,
    running_workers,
    states_of,
    wait_for,
)

START = 100


async def assert_uncharged(
    credits: CreditStub,
    database_url: str,
    user: User,
    generation: generation_pb2.Generation,
    hold_states: set[str],
) -> None:
    """No capture, nothing held, the balance as granted, and the hold in one of `hold_states`."""
    assert generation.transaction_id == ""
    assert await captures(credits, user) == []
    assert await balance(credits, user) == (START, 0)
    assert await hold_state(database_url, generation.hold_id) in hold_states


# Failures


@pytest.mark.parametrize(
    ("fail", "attempts", "message"),
    [("transient", 2, "transient failure on attempt 2"), ("always", 1, "permanent failure")],
)
async def test_a_failing_provider_fails_uncharged_after_its_attempts(
    server: application.Application,
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
    fail: str,
    attempts: int,
    message: str,
) -> None:
    user = await funded(credits, START)
    created = await create(generations, user, parameters={"fail": fail})
    async with running_workers(server):
        final = await wait_for(generations, user, created.generation_id)
    assert (final.state, final.attempts, final.output) == (FAILED, attempts, b"")
    assert message in final.error_message
    await assert_uncharged(credits, database_url, user, final, {"released"})


async def test_a_retried_job_succeeds_and_is_charged_once(
    server: application.Application, credits: CreditStub, generations: GenerationStub
) -> None:
    user = await funded(credits, START)
    created = await create(generations, user, parameters={"fail": "first:1"})
    async with running_workers(server):
        final = await wait_for(generations, user, created.generation_id)
    assert (final.state, final.attempts) == (SUCCEEDED, 2)
    assert [t.amount for t in await captures(credits, user)] == [COST]
    assert await balance(credits, user) == (START - COST, 0)


# Cancellation


async def test_a_queued_generation_cancelled_is_never_run(
    server: application.Application,
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
) -> None:
    user = await funded(credits, START)
    created = await create(generations, user)
    reply = await generations.CancelGeneration(
        gpb.CancelGenerationRequest(generation_id=created.generation_id), metadata=user.metadata
    )
    assert (reply.generation.state, reply.generation.attempts) == (CANCELLED, 0)
    providers = recording_providers(server)
    async with running_workers(server, providers=providers):
        await asyncio.sleep(0.5)
    assert created.generation_id not in providers[created.model].started
    final = await get(generations, user, created.generation_id)
    assert (final.state, final.attempts) == (CANCELLED, 0)
    await assert_uncharged(credits, database_url, user, final, {"released"})


async def test_cancelling_a_running_generation_stops_its_provider_and_never_charges(
    server: application.Application,
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
) -> None:
    delay = 3.0
    user = await funded(credits, START)
    created = await create(generations, user, parameters={"delay_ms": str(int(delay * 1000))})
    providers = recording_providers(server)
    provider = providers[created.model]
    async with running_workers(server, providers=providers):
        await wait_for(generations, user, created.generation_id, {RUNNING}, within=5)
        cancelled_at = time.monotonic()
        reply = await generations.CancelGeneration(
            gpb.CancelGenerationRequest(generation_id=created.generation_id),
            metadata=user.metadata,
        )
        assert reply.generation.state == CANCELLED
        # The next lease renewal (every lease/3 ~ 0.7 s) finds the job gone and stops the call.
        deadline = cancelled_at + 2.0
        while created.generation_id not in provider.stopped:
            assert time.monotonic() < deadline, "the provider call was not stopped"
            await asyncio.sleep(0.05)
        assert provider.stopped[created.generation_id] - cancelled_at < 1.5
        # Past the moment the provider would have answered: still cancelled, nothing charged.
        await asyncio.sleep(max(0.0, cancelled_at + delay + 0.5 - time.monotonic()))
    assert created.generation_id not in provider.finished
    assert provider.started[created.generation_id] == 1
    final = await get(generations, user, created.generation_id)
    assert (final.state, final.attempts) == (CANCELLED, 1)
    await assert_uncharged(credits, database_url, user, final, {"released"})


# Expired reservations


async def test_a_job_whose_hold_expired_fails_uncharged(
    server: application.Application,
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
) -> None:
    user = await funded(credits, START)
    created = await create(generations, user)
    async with owner_connection(database_url) as conn:
        await conn.execute(
            "update public.credit_holds set expires_at = now() - interval '1 second'"
            " where hold_id = $1::uuid",
            created.hold_id,
        )
    async with running_workers(server):
        final = await wait_for(generations, user, created.generation_id)
    assert (final.state, final.attempts) == (FAILED, 0)
    assert "reservation" in final.error_message
    await assert_uncharged(credits, database_url, user, final, {"expired", "released"})


# Many jobs, several workers


@contextlib.asynccontextmanager
async def active_generations_cap(database_url: str, cap: int) -> AsyncIterator[None]:
    """CREDITS_MAX_ACTIVE_GENERATIONS as `cap` in the database, then back to the default 8."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("select public.credit_configure_limits(null, null, $1)", cap)
        yield
    finally:
        await conn.execute("select public.credit_configure_limits(null, null, 8)")
        await conn.close()


async def test_fifty_generations_across_four_workers_are_each_charged_once(
    server: application.Application,
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
) -> None:
    count, start = 50, 1000
    user = await funded(credits, start)
    # Created first, then run: claims and completions race each other. (All 50 active at once:
    # past the cap on a user's active generations, raised for this test.)
    async with active_generations_cap(database_url, count):
        created = await asyncio.gather(
            *(create(generations, user, prompt=f"picture {i}") for i in range(count))
        )
    ids = {g.generation_id for g in created}
    assert len(ids) == count
    assert await balance(credits, user) == (start, count * COST)
    async with running_workers(server, 4):
        deadline = time.monotonic() + 60
        while (states := await states_of(database_url, user)).get("succeeded", 0) < count:
            assert time.monotonic() < deadline, f"not all succeeded: {states}"
            await asyncio.sleep(0.1)
    assert await states_of(database_url, user) == {"succeeded": count}, "none queued or running"
    charged = await captures(credits, user)
    assert len(charged) == count
    assert {t.amount for t in charged} == {COST}
    listed = await generations.ListGenerations(
        gpb.ListGenerationsRequest(page_size=count), metadata=user.metadata
    )
    assert {g.generation_id for g in listed.generations} == ids
    assert {g.transaction_id for g in listed.generations} == {t.transaction_id for t in charged}
    assert {t.hold_id for t in charged} == {g.hold_id for g in created}
    assert await balance(credits, user) == (start - count * COST, 0)


@pytest.mark.parametrize("server", ["postgres"], indirect=True)
async def test_a_claim_skips_a_job_whose_owner_is_busy(
    server: application.Application,
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
) -> None:
    """A job whose owner's profile another transaction holds is left for a later claim: the
    claim neither waits nor spins (it once did, stalling a cancel racing it for 10 s)."""
    user = await funded(credits, START)
    created = await create(generations, user)
    try:
        async with (
            owner_connection(database_url) as holder,
            owner_connection(database_url) as probe,
        ):
            await probe.execute("set statement_timeout = '1500ms'")
            async with holder.transaction():
                await holder.execute(
                    "select 1 from public.credit_profiles where user_id = $1 for update", user.id
                )
                started = time.monotonic()
                with contextlib.suppress(asyncpg.QueryCanceledError):
                    await probe.fetchval("select public.credit_claim_generation('probe', 2)")
                elapsed = time.monotonic() - started
        assert elapsed < 1.0, f"the claim took {elapsed:.1f} s while the profile was busy"
    finally:
        await cancel_unfinished(generations, [created.generation_id])


# Stopping workers


class FailureSignal:
    """The real generation repository, with `recorded` set once it has recorded a failure."""

    def __init__(self, inner: GenerationRepository) -> None:
        self._inner = inner
        self.recorded = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def fail(self, *args: Any, **kwargs: Any) -> Any:
        ended = await self._inner.fail(*args, **kwargs)
        self.recorded.set()
        return ended


async def test_a_worker_stops_at_once_when_cancelled_just_after_recording_a_failure(
    server: application.Application, credits: CreditStub, generations: GenerationStub
) -> None:
    """The cancel lands while the worker is stopping its lease keeper: the moment a caller first
    sees FAILED. The worker once took the keeper's cancellation for its own and swallowed the
    one meant for it: it kept claiming jobs, and its pool's stop never returned."""
    backend = server.backend
    repository = FailureSignal(backend.generations)
    worker = Worker(
        repository,  # type: ignore[arg-type]
        backend.catalogue,
        load_providers(backend.catalogue),
        backend.feed,
        FAST,
        name="cancelled-after-failing",
    )
    user = await funded(credits, START)
    created = await create(generations, user, parameters={"fail": "always"})
    running = asyncio.create_task(worker.run())
    async with asyncio.timeout(15):  # not wait_for: its own task would make the test late
        await repository.recorded.wait()
    running.cancel()  # what WorkerPool.stop does
    done, _ = await asyncio.wait({running}, timeout=5)
    if not done:  # leave no worker behind: a second cancel ends it
        running.cancel()
        await asyncio.wait({running})
    assert done, "the worker was still running 5 s after it was cancelled"
    assert running.cancelled()
    assert (await get(generations, user, created.generation_id)).state == FAILED


# A worker process killed mid-job (PostgreSQL only: `credits worker` needs DATABASE_URL)


@contextlib.contextmanager
def worker_process(database_url: str, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`credits worker` over the session database with one worker and a 2 s lease; killed for
    sure at the end."""
    log_path = workdir / "worker.log"
    env = embedded_env(
        workdir / "unused-data",
        0,
        {
            "DATABASE_URL": database_url,
            "CREDITS_MODELS": str(TEST_MODELS),
            "CREDITS_WORKERS": "1",
            "CREDITS_WORKER_LEASE_SECONDS": "2",
            "SUPABASE_JWT_SECRET": TEST_JWT_SECRET,
        },
    )
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [str(CREDITS), "worker"],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield popen
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait(timeout=10)


@pytest.mark.parametrize("server", ["postgres"], indirect=True)
async def test_a_job_of_a_killed_worker_is_run_again_and_charged_once(
    server: application.Application,
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
    tmp_path: Path,
) -> None:
    user = await funded(credits, START)
    created = await create(generations, user, parameters={"delay_ms": "4000"})
    try:
        with worker_process(database_url, tmp_path) as popen:
            try:
                running = await wait_for(
                    generations, user, created.generation_id, {RUNNING}, within=20
                )
            except AssertionError:
                log = (tmp_path / "worker.log").read_text(errors="replace")
                raise AssertionError(
                    f"exit code {popen.poll()}\n--- worker log ---\n{log}"
                ) from None
            assert running.attempts == 1
            os.kill(popen.pid, signal.SIGKILL)
            assert popen.wait(timeout=10) == -signal.SIGKILL
        # The killed worker's lease (2 s) runs out; an in-process worker takes the job over.
        async with running_workers(server):
            final = await wait_for(generations, user, created.generation_id, FINAL, within=15)
    finally:
        await cancel_unfinished(generations, [created.generation_id])
    assert (final.state, final.attempts) == (SUCCEEDED, 2)
    charged = await captures(credits, user)
    assert [(t.amount, t.transaction_id) for t in charged] == [(COST, final.transaction_id)]
    assert await balance(credits, user) == (START - COST, 0)
    assert await hold_state(database_url, final.hold_id) == "captured"
