"""The generation queue's figures: how fast generations go from create to SUCCEEDED (with the
demo provider at no delay, bench/models.toml) against CreateGeneration's own rate, and how long
a generation waits from create to RUNNING when they are created at half that rate.

Times come from the database's own announcements (LISTEN on `credit_generations`, one per state
change, sent at commit), read by one listener on one clock: a generation's wait is from its
`queued` announcement to its `running` one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc.aio

from bench.scenarios import Scenario

# How long the queue may take to drain after the creating stops.
DRAIN_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class Drained:
    """Generations created in a run, and how fast they went from create to SUCCEEDED."""

    succeeded: int
    others: int
    per_second: float


@dataclass(frozen=True, slots=True)
class Waits:
    """Create-to-RUNNING waits (ms) of generations created at `rate` a second."""

    rate: float
    waits_ms: Sequence[float]

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.waits_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def since(database_url: str) -> object:
    """The database's clock now: where a run's generations start."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("select clock_timestamp()")
    finally:
        await conn.close()


async def drained(database_url: str, start: object) -> Drained:
    """Waits until the generations created since `start` have all ended, then their rate from
    the first one's creation to the last one's success."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline:
            waiting = await conn.fetchval(
                "select count(*) from public.credit_generations"
                " where created_at >= $1 and state in ('queued', 'running')",
                start,
            )
            if not waiting:
                break
            await asyncio.sleep(0.2)
        row = await conn.fetchrow(
            "select count(*) filter (where state = 'succeeded') as succeeded,"
            " count(*) filter (where state <> 'succeeded') as others,"
            " extract(epoch from max(updated_at) filter (where state = 'succeeded')"
            "   - min(created_at)) as seconds"
            " from public.credit_generations where created_at >= $1",
            start,
        )
    finally:
        await conn.close()
    if row is None:  # an aggregate always has its row
        raise RuntimeError("no answer from the generations' count")
    seconds = float(row["seconds"] or 0.0)
    rate = row["succeeded"] / seconds if seconds > 0 else float("nan")
    return Drained(row["succeeded"], row["others"], rate)


async def waits(
    target: str,
    scenario: Scenario,
    database_url: str,
    rate: float,
    seconds: float,
    tag: str = "queue",
) -> Waits:
    """Creates generations at `rate` a second (open loop: each on time, whatever the ones
    before it are doing) for `seconds`, and measures each one's create-to-RUNNING wait. Their
    request ids come from `tag`: another run on the same database needs another one, or its
    creates replay the generations made before and nothing is measured."""
    queued: dict[str, float] = {}
    running: dict[str, float] = {}
    started = asyncio.Event()  # another generation is RUNNING

    def heard(_conn: Any, _pid: int, _channel: str, payload: Any) -> None:
        change = json.loads(payload)
        seen = {"queued": queued, "running": running}.get(change.get("state"))
        if seen is not None:
            seen.setdefault(change["generation_id"], time.perf_counter())
            started.set()

    listener = await asyncpg.connect(database_url)
    await listener.add_listener("credit_generations", heard)
    created: list[str] = []
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            call = scenario.bind(channel)
            start = time.perf_counter()
            pending: set[asyncio.Task[None]] = set()

            async def create(n: int) -> None:
                request, metadata = scenario.request(tag, n)
                response = await call(request, metadata=metadata)
                created.append(response.generation.generation_id)

            for n in itertools.count():
                due = start + n / rate
                if due - start >= seconds:
                    break
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                task = asyncio.create_task(create(n))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)
        deadline = time.monotonic() + DRAIN_SECONDS
        while any(g not in running for g in created):
            started.clear()
            try:
                await asyncio.wait_for(started.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
    finally:
        await listener.close()
    found = [(running[g] - queued[g]) * 1000 for g in created if g in running and g in queued]
    return Waits(rate, found)
