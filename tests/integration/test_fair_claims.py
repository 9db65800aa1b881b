"""Workers claim fairly across users: the oldest runnable job of the user with the fewest jobs
running goes first, so one user's backlog cannot hold every worker while another user waits.

The claim order is read from `credit_claim_generation` itself, in a transaction that is always
rolled back with the shared queue parked (as tests/integration/test_sql_security.py does), so
the jobs made there are the only ones a claim can take. Then the same on the real server, with
two workers and providers that hold each job until the test lets it finish: no timing involved.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from server import app as application
from server.generation.providers.base import Job, Output, Provider
from server.generation.worker import load_providers
from tests.fixtures.workers import (
    SUCCEEDED,
    CreditStub,
    GenerationStub,
    cancel_unfinished,
    create,
    funded,
    owner_connection,
    running_workers,
    wait_for,
)

FAIR_MODEL = "fair-claims-model"


@pytest.fixture
async def queue(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The owner's connection in a transaction that is rolled back at the end, with FAIR_MODEL
    in the catalogue and every job queued or running so far out of the claims' reach."""
    async with owner_connection(database_url) as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(
                "insert into public.credit_models (model, cost, timeout_seconds, max_attempts)"
                " values ($1, 5, 30, 2) on conflict (model) do update set active = true",
                FAIR_MODEL,
            )
            await conn.execute(
                "update public.credit_generations set next_attempt_at = 'infinity',"
                " lease_expires_at = case when lease_expires_at is not null"
                " then 'infinity'::timestamptz end"
                " where state in ('queued', 'running')"
            )
            yield conn
        finally:
            await transaction.rollback()


async def user_with_credits(conn: asyncpg.Connection) -> uuid.UUID:
    user_id = uuid.uuid4()
    await conn.execute("select public.credit_provision_profile($1::uuid, '')", user_id)
    await conn.execute("select public.credit_grant($1, 100, 'seed', 'seed', '{}'::jsonb)", user_id)
    return user_id


async def queued(conn: asyncpg.Connection, user_id: uuid.UUID, due_seconds_ago: int) -> str:
    """A queued job of `user_id`, due since `due_seconds_ago` (a transaction's now() does not
    move, so each job is given its own time)."""
    created = json.loads(
        await conn.fetchval(
            "select public.credit_create_generation($1, $2, 'p', '{}'::jsonb, $3)",
            user_id,
            FAIR_MODEL,
            uuid.uuid4().hex,
        )
    )
    generation_id: str = created["generation"]["generation_id"]
    await conn.execute(
        "update public.credit_generations"
        " set next_attempt_at = now() - make_interval(secs => $2) where generation_id = $1",
        uuid.UUID(generation_id),
        due_seconds_ago,
    )
    return generation_id


async def claimed(conn: asyncpg.Connection) -> str | None:
    """The generation id the next claim takes (a lease of a minute), or None."""
    value = await conn.fetchval("select public.credit_claim_generation('fair-worker', 60)")
    return None if value is None else str(json.loads(value)["generation_id"])


async def test_the_user_with_fewer_running_jobs_is_claimed_first(
    queue: asyncpg.Connection,
) -> None:
    alice, bob = await user_with_credits(queue), await user_with_credits(queue)
    a1, a2, a3 = [await queued(queue, alice, ago) for ago in (50, 40, 30)]
    assert [await claimed(queue), await claimed(queue)] == [a1, a2]  # her own: oldest first

    b1 = await queued(queue, bob, 20)  # younger than a3, but bob runs nothing
    assert await claimed(queue) == b1
    b2 = await queued(queue, bob, 10)  # bob runs one job, alice two
    assert await claimed(queue) == b2
    # Equally busy now: the job due first goes first.
    b3 = await queued(queue, bob, 5)
    assert [await claimed(queue), await claimed(queue)] == [a3, b3]
    assert await claimed(queue) is None


async def test_an_expired_lease_does_not_count_as_running(queue: asyncpg.Connection) -> None:
    """A job whose worker was lost is not its user's load: the user is as idle as any other,
    and the lost job itself is taken over in its turn."""
    alice, bob = await user_with_credits(queue), await user_with_credits(queue)
    lost = await queued(queue, alice, 50)
    assert await claimed(queue) == lost
    await queue.execute(
        "update public.credit_generations set lease_expires_at = now() - interval '1 second'"
        " where generation_id = $1",
        uuid.UUID(lost),
    )
    a2 = await queued(queue, alice, 40)
    b1 = await queued(queue, bob, 30)
    assert [await claimed(queue), await claimed(queue), await claimed(queue)] == [lost, b1, a2]


# On the real server


@dataclass
class Gate:
    """Fake providers that hold every job until the test opens its generation's gate, and
    record the order jobs started in; the real provider makes the output."""

    started: list[str] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def provider(self, inner: Provider) -> Provider:
        gate = self

        class Held:
            async def generate(self, job: Job) -> Output:
                async with gate.changed:
                    gate.started.append(job.generation_id)
                    gate.changed.notify_all()
                await gate.gates.setdefault(job.generation_id, asyncio.Event()).wait()
                return await inner.generate(job)

        return Held()

    def open(self, *generation_ids: str) -> None:
        for generation_id in generation_ids:
            self.gates.setdefault(generation_id, asyncio.Event()).set()

    async def until_started(self, count: int) -> list[str]:
        async with asyncio.timeout(15), self.changed:
            await self.changed.wait_for(lambda: len(self.started) >= count)
        return list(self.started)


async def test_a_freed_worker_takes_another_users_job_before_a_backlog(
    server: application.Application, credits: CreditStub, generations: GenerationStub
) -> None:
    """Two workers; A queues three jobs, both workers take two of them, then B queues one. When
    one of A's jobs ends, the freed worker takes B's job, not A's third (which is older)."""
    gate = Gate()
    real = load_providers(server.backend.catalogue)
    providers = {name: gate.provider(inner) for name, inner in real.items()}
    a, b = await funded(credits, 100), await funded(credits, 100)
    made: list[str] = []
    try:
        async with running_workers(server, 2, providers=providers):
            for _ in range(3):
                made.append((await create(generations, a)).generation_id)
            first_two = await gate.until_started(2)
            assert set(first_two) == set(made[:2])
            made.append((await create(generations, b)).generation_id)
            a3, b1 = made[2], made[3]

            gate.open(first_two[0])
            assert (await gate.until_started(3))[2] == b1
            gate.open(*made)
            for user, generation_id in ((a, made[0]), (a, made[1]), (a, a3), (b, b1)):
                assert (await wait_for(generations, user, generation_id)).state == SUCCEEDED
            assert gate.started.index(b1) < gate.started.index(a3)
    finally:
        await cancel_unfinished(generations, made)
