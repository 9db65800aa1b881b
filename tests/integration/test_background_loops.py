"""The service's background loops (the event pump, the webhook deliverers, the hold sweeper, the
generation workers, the queue's gauges, the change feed) outlive an error they did not expect:
it is logged with its traceback, and the loop goes on. A loop that ended would stop its work
until the next restart, silently.

Each test but the change feed's runs one loop over the real transport, on a database of its
own in which the SQL function the loop calls first fails once with an error no domain error
stands for (a check violation, as books found out of step would raise), then works as before: a
shim in its place counts the calls and hands every call after the first to the real function,
renamed. The change feed's connection goes through a proxy that drops it the first time it
sets up LISTEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest
from prometheus_client import REGISTRY

from server import runtime
from server.credit.sweeper import HoldSweeper
from server.events.webhooks import DeliveryPool, new_secret
from server.generation.feed import ChangeFeed
from server.generation.models import ModelSpec
from server.generation.providers.base import Job, Output
from server.generation.worker import Worker
from server.observability import metrics
from server.repository.breaker import CredentialBreaker
from server.repository.credits import CreditRepository
from server.repository.events import EventRepository
from server.repository.generations import GenerationRepository
from server.repository.layered import LayeredRepository
from server.transports.change_feed import PostgresChangeFeed
from server.transports.postgres import PostgresTransport
from tests.fixtures.database import migrated_database
from tests.fixtures.webhooks import FAST as FAST_DELIVERY
from tests.fixtures.webhooks import Receiver, debit_event, until
from tests.fixtures.workers import FAST as FAST_WORKER

# Counts the shims' calls.
CALLS = "create sequence public.test_calls"


def shim(function: str, params: str, returns: str) -> str:
    """DDL (of this module's constants) putting a shim in place of `public.<function>`, whose
    parameters are `params` ("name type, ..."): its first call fails with a check violation,
    every other is handed to the real function, renamed `real_<function>`."""
    declared = [param.split() for param in params.split(", ") if param]
    names = ", ".join(name for name, _ in declared)
    types = ", ".join(kind for _, kind in declared)
    return f"""
alter function public.{function}({types}) rename to real_{function};
create function public.{function}({params}) returns {returns}
language plpgsql security definer set search_path = '' as $$
begin
  if pg_catalog.nextval('public.test_calls') = 1 then
    raise exception 'failed once by a test' using errcode = '23514';
  end if;
  return public.real_{function}({names});
end $$;
grant execute on function public.{function}({types}) to service_role;
"""


SHIMS = {
    "dispatch": shim("credit_dispatch_events", "p_limit integer", "integer"),
    "deliveries": shim(
        "credit_claim_deliveries",
        "p_worker text, p_limit integer, p_lease_seconds integer",
        "jsonb",
    ),
    "sweep": shim("credit_expire_holds", "p_users integer", "integer"),
    "claim": shim("credit_claim_generations", "p_workers text[], p_lease_seconds integer", "jsonb"),
    "queue": shim("credit_queue_stats", "", "jsonb"),
    "complete": shim(
        "credit_complete_generation",
        "p_generation_id uuid, p_worker text, p_output text, p_output_mime_type text",
        "jsonb",
    ),
}


@pytest.fixture
async def database(postgres_admin_url: str) -> AsyncIterator[str]:
    async with migrated_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
async def owner(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(CALLS)
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def layers(database: str) -> AsyncIterator[LayeredRepository]:
    transport = await PostgresTransport.connect(database, min_size=1, max_size=4)
    try:
        yield LayeredRepository(transport, CredentialBreaker())
    finally:
        await transport.close()


async def calls(owner: asyncpg.Connection) -> int:
    called: int = await owner.fetchval("select last_value from public.test_calls")
    return called


def background_errors(loop: str) -> float:
    counted = REGISTRY.get_sample_value("credits_background_errors_total", {"loop": loop})
    return counted or 0.0


@contextlib.contextmanager
def logged_once(
    caplog: pytest.LogCaptureFixture,
    loop: str,
    message: str,
    cause: str | None = "failed once by a test",
) -> Iterator[None]:
    """In the block `loop` logs `message` at ERROR once, with the error's traceback (which says
    `cause`), and counts it in credits_background_errors_total."""
    before = background_errors(loop)
    with caplog.at_level(logging.ERROR):
        yield
    [record] = [r for r in caplog.records if r.getMessage() == message]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert cause is None or cause in str(record.exc_info[1])
    assert background_errors(loop) == before + 1


@pytest.mark.parametrize("shim", ["dispatch", "deliveries"])
async def test_an_event_is_delivered_after_the_pump_or_a_deliverer_met_an_unexpected_error(
    database: str,
    owner: asyncpg.Connection,
    layers: LayeredRepository,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    shim: str,
) -> None:
    queue = EventRepository(layers)
    await queue.add(receiver.url, ["transaction.created"], new_secret())
    await owner.execute(SHIMS[shim])
    loop = {"dispatch": "event_pump", "deliveries": "webhook_deliverer"}[shim]
    pool = DeliveryPool(queue, 1, FAST_DELIVERY, pump_interval=0.05)
    with logged_once(caplog, loop, f"{loop.replace('_', ' ')}: unexpected error"):
        pool.start()
        try:
            event_id = await debit_event(database)
            await asyncio.wait_for(receiver.arrived.wait(), 10)
        finally:
            await pool.stop(grace=1)
    assert [headers["webhook-id"] for headers, _ in receiver.received] == [str(event_id)]
    assert await calls(owner) >= 2


async def test_the_sweeper_settles_after_an_unexpected_error(
    owner: asyncpg.Connection, layers: LayeredRepository, caplog: pytest.LogCaptureFixture
) -> None:
    user = uuid.uuid4()
    await owner.execute("select public.credit_provision_profile($1, '')", user)
    await owner.execute(
        "select public.credit_grant($1, 10, 'k', '', '{}'::jsonb,"
        " credits_private.now() + interval '1 minute')",
        user,
    )
    await owner.execute("""update credits_private.clock set "offset" = $1""", timedelta(minutes=2))
    await owner.execute(SHIMS["sweep"])
    sweeper = HoldSweeper(CreditRepository(layers), interval=0.05)
    expired = (
        "select count(*) from public.credit_transactions where user_id = $1 and kind = 'expire'"
    )

    async def settled() -> bool:
        return bool(await owner.fetchval(expired, user))

    with logged_once(caplog, "hold_sweeper", "hold sweep failed unexpectedly"):
        sweeper.start()
        try:
            await until(settled)
        finally:
            await sweeper.stop()
    assert await calls(owner) >= 2


async def test_a_worker_claims_again_after_an_unexpected_error(
    owner: asyncpg.Connection, layers: LayeredRepository, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(GenerationRepository(layers), {}, {}, ChangeFeed(), FAST_WORKER, name="w")

    async def claimed_again() -> bool:
        return await calls(owner) >= 3

    await owner.execute(SHIMS["claim"])
    with logged_once(caplog, "generation_worker", "worker w cannot claim"):
        running = asyncio.create_task(worker.run())
        try:
            await until(claimed_again)
        finally:
            await runtime.stop(running)


class Painter:
    """A provider that paints every job at once."""

    async def generate(self, job: Job) -> Output:
        return Output(b"paint", "image/png")


async def test_a_job_whose_result_met_an_unexpected_error_is_run_again(
    owner: asyncpg.Connection, layers: LayeredRepository, caplog: pytest.LogCaptureFixture
) -> None:
    spec = ModelSpec("paint", 5, "", "demo", max_attempts=3)
    await owner.execute(
        "select public.credit_sync_models($1::jsonb)",
        json.dumps(
            [
                {
                    "model": "paint",
                    "cost": 5,
                    "description": "",
                    "timeout_seconds": 60,
                    "max_attempts": 3,
                }
            ]
        ),
    )
    user = uuid.uuid4()
    await owner.execute("select public.credit_provision_profile($1, '')", user)
    await owner.execute("select public.credit_grant($1, 10, 'k', '', '{}'::jsonb)", user)
    generation = await owner.fetchval(
        "select (public.credit_create_generation($1, 'paint', 'a cat', '{}', 'r1')"
        " -> 'generation' ->> 'generation_id')::uuid",
        user,
    )
    await owner.execute(SHIMS["complete"])
    queue = GenerationRepository(layers)
    worker = Worker(queue, {"paint": spec}, {"paint": Painter()}, ChangeFeed(), FAST_WORKER, "w")
    state = "select state from public.credit_generations where generation_id = $1"

    async def succeeded() -> bool:
        return await owner.fetchval(state, generation) == "succeeded"

    failed = f"worker w: generation {generation} failed unexpectedly"
    with logged_once(caplog, "generation_worker", failed):
        running = asyncio.create_task(worker.run())
        try:
            await until(succeeded)  # on its second attempt, once the first's lease ran out
        finally:
            await runtime.stop(running)
    assert await calls(owner) == 2


async def test_the_queue_gauges_are_read_again_after_an_unexpected_error(
    owner: asyncpg.Connection, layers: LayeredRepository, caplog: pytest.LogCaptureFixture
) -> None:
    async def read_again() -> bool:
        return await calls(owner) >= 3

    await owner.execute(SHIMS["queue"])
    queue = GenerationRepository(layers)
    with logged_once(caplog, "queue_gauges", "cannot read the generation queue"):
        tracking = asyncio.create_task(metrics.track_queue(queue.queue_stats, interval=0.05))
        try:
            await until(read_again)
        finally:
            await runtime.stop(tracking)


class DroppingProxy:
    """A TCP proxy to the database that drops the first connection whose client sends LISTEN,
    as it sends it."""

    def __init__(self, url: str) -> None:
        self._url = urlsplit(url)
        self.dropped = 0
        self.port = 0

    async def __aenter__(self) -> DroppingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._server.close()

    def url(self) -> str:
        """The database's URL, through the proxy."""
        user = self._url.netloc.rpartition("@")[0]
        return urlunsplit(
            ("postgresql", f"{user}@127.0.0.1:{self.port}", self._url.path, "sslmode=disable", "")
        )

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        directory = parse_qs(self._url.query).get("host", [""])[0]
        port = self._url.port or 5432
        if directory.startswith("/"):
            return await asyncio.open_unix_connection(f"{directory}/.s.PGSQL.{port}")
        return await asyncio.open_connection(self._url.hostname, port)

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await self._upstream()

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, up: bool) -> None:
            while data := await source.read(65536):
                if up and b"LISTEN" in data and not self.dropped:
                    self.dropped += 1
                    break
                sink.write(data)
                await sink.drain()
            to_client.close()
            to_server.close()

        await asyncio.gather(
            pipe(client, to_server, True), pipe(server, to_client, False), return_exceptions=True
        )


async def test_the_change_feed_listens_again_after_its_connection_failed_while_it_set_up(
    database: str, owner: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    generation = uuid.uuid4()
    change = {
        "generation_id": str(generation),
        "state": "running",
        "attempts": 1,
        "error_message": "",
        "transaction_id": None,
        "output_mime_type": "",
        "update_time": "2026-12-05T00:00:00+00:00",
    }
    async with DroppingProxy(database) as proxy:
        feed = PostgresChangeFeed(proxy.url(), reconnect_delay=0.05)
        failed = "change feed failed; listening again"
        with logged_once(caplog, "change_feed", failed, cause=None):
            await asyncio.wait_for(feed.start(), 10)  # listening, on its second connection
        try:
            async with feed.changes(generation) as changes:
                notify = "select pg_notify('credit_generations', $1)"
                await owner.execute(notify, json.dumps(change))
                heard = await asyncio.wait_for(changes.get(), 10)
        finally:
            await feed.close()
    assert (heard.generation_id, heard.state.value) == (generation, "running")
    assert proxy.dropped == 1
