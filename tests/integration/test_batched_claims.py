"""Workers of one process claim and complete jobs together (credit_claim_generations,
credit_complete_generations, *_credits_batched_claims.sql): one claim takes jobs in the fair
order one claim after another would, each leased to its own worker; one completion of several
jobs charges each as its own completion would, and one job's error undoes none of the others.

The SQL is read in a transaction that is always rolled back with the shared queue parked (the
`queue` fixture of test_fair_claims); then workers claim and complete through both transports.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import grpc.aio
import pytest

from credits.v1 import credit_service_pb2 as cpb
from server import app as application
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.server import settings_for
from tests.fixtures.workers import (
    COST,
    SUCCEEDED,
    CreditStub,
    GenerationStub,
    cancel_unfinished,
    create,
    funded,
    running_workers,
    wait_for,
)
from tests.integration.test_fair_claims import queue, queued, user_with_credits

__all__ = ["queue"]  # the fixture, used by name


async def claim(conn: asyncpg.Connection, *workers: str) -> dict[str, str]:
    """The generation ids one claim gives `workers`, by worker."""
    jobs = json.loads(
        await conn.fetchval("select public.credit_claim_generations($1, 60)", list(workers))
    )
    return {job["worker"]: job["generation_id"] for job in jobs}


async def test_one_claim_takes_jobs_in_the_fair_order(queue: asyncpg.Connection) -> None:
    """As one claim after another would: alice's oldest, then bob's and carol's (they run
    nothing), then alice's next (all three now run one, and hers is due first)."""
    alice, bob, carol = [await user_with_credits(queue) for _ in range(3)]
    a1, a2, a3 = [await queued(queue, alice, ago) for ago in (50, 40, 30)]
    b1, b2 = [await queued(queue, bob, ago) for ago in (20, 10)]
    c1 = await queued(queue, carol, 5)

    taken = await claim(queue, "w1", "w2", "w3", "w4")
    assert taken == {"w1": a1, "w2": b1, "w3": c1, "w4": a2}
    owners = await queue.fetch(
        "select generation_id::text, lease_owner from public.credit_generations"
        " where generation_id = any($1::uuid[]) and state = 'running'",
        list(taken.values()),
    )
    assert {row["generation_id"]: row["lease_owner"] for row in owners} == {
        job: worker for worker, job in taken.items()
    }
    # Alice runs two now, bob one: his next goes before her third; then nothing is left.
    assert await claim(queue, "w5", "w6", "w7") == {"w5": b2, "w6": a3}
    assert await claim(queue, "w8") == {}


async def test_a_claim_that_takes_a_job_does_not_wait_for_its_flush(
    queue: asyncpg.Connection,
) -> None:
    """Only a claim that took a job commits asynchronously, and only its own transaction."""
    assert await claim(queue, "w1") == {}
    assert await queue.fetchval("select current_setting('synchronous_commit')") == "on"
    await queued(queue, await user_with_credits(queue), 10)
    assert len(await claim(queue, "w1")) == 1
    assert await queue.fetchval("select current_setting('synchronous_commit')") == "off"


async def complete(conn: asyncpg.Connection, *jobs: tuple[str, str]) -> list[dict[str, Any]]:
    """One completion of `jobs` (generation id, worker), each with a small output."""
    payload = [
        {"generation_id": g, "worker": w, "output": "aGk=", "output_mime_type": "text/plain"}
        for g, w in jobs
    ]
    results: list[dict[str, Any]] = json.loads(
        await conn.fetchval(
            "select public.credit_complete_generations($1::jsonb)", json.dumps(payload)
        )
    )
    return results


async def test_one_completion_charges_each_job_as_its_own_would(
    queue: asyncpg.Connection,
) -> None:
    """A job completed by its worker is charged; one completed by another worker is not (its
    result discarded); an unknown one is GENERATION_NOT_FOUND (CR009). Each result in the
    order given, and the error undoes neither of the others."""
    alice, bob = await user_with_credits(queue), await user_with_credits(queue)
    mine = await queued(queue, alice, 20)
    theirs = await queued(queue, bob, 10)
    assert await claim(queue, "w1", "w2") == {"w1": mine, "w2": theirs}

    unknown = str(uuid.uuid4())
    results = await complete(queue, (unknown, "w1"), (mine, "w1"), (theirs, "w1"))
    assert results[0]["error_code"] == "CR009"
    assert results[1:] == [{"charged": True}, {"charged": False}]
    states = await queue.fetch(
        "select generation_id::text, state, output from public.credit_generations"
        " where generation_id = any($1::uuid[])",
        [mine, theirs],
    )
    assert {r["generation_id"]: (r["state"], r["output"]) for r in states} == {
        mine: ("succeeded", b"hi"),
        theirs: ("running", None),
    }
    balances = await queue.fetch(
        "select user_id, balance, held from public.credit_profiles where user_id = any($1)",
        [alice, bob],
    )
    assert {r["user_id"]: (r["balance"], r["held"]) for r in balances} == {
        alice: (95, 0),
        bob: (100, 5),
    }


@pytest.mark.parametrize("transport", ["postgres", "supabase"])
async def test_workers_claim_and_complete_together_through_either_transport(
    database_url: str, supabase: FakeSupabase, transport: str
) -> None:
    """Four workers of one process on eight jobs: every job succeeds, charged once."""
    app = await application.start(settings_for(transport, database_url, supabase))
    made: list[str] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            credits, generations = CreditStub(channel), GenerationStub(channel)
            user = await funded(credits, 100)
            try:
                made = [(await create(generations, user)).generation_id for _ in range(8)]
                async with running_workers(app, 4):
                    for generation_id in made:
                        done = await wait_for(generations, user, generation_id)
                        assert done.state == SUCCEEDED
            finally:
                await cancel_unfinished(generations, made)
            balance = await credits.GetBalance(cpb.GetBalanceRequest(), metadata=user.metadata)
            assert (balance.balance, balance.held) == (100 - 8 * COST, 0)
    finally:
        await app.stop()
