"""`python -m bench.webhooks`: webhook delivery throughput, events delivered per second.

An endpoint on a local receiver (aiohttp, answering 204) subscribed to `transaction.created`,
EVENTS ledger entries written at once, then the event pump and DELIVERERS deliverers of
`credits serve` (server/events/webhooks.py) over the direct transport, timed from their start
until the receiver has every event. `make bench` reports it too.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

import asyncpg
from aiohttp import web

from bench import servers
from server.events.webhooks import DeliveryPool, DeliverySettings, new_secret
from server.repository.breaker import CredentialBreaker
from server.repository.events import EventRepository
from server.repository.layered import LayeredRepository
from server.transports.postgres import PostgresTransport

EVENTS = 2000
DELIVERERS = 4


async def measure(database_url: str, events: int = EVENTS, deliverers: int = DELIVERERS) -> float:
    """Events delivered per second by `deliverers` deliverers, `events` of them."""
    received: set[str] = set()
    done = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        received.add(request.headers["webhook-id"])
        if len(received) >= events:
            done.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    transport = await PostgresTransport.connect(database_url, max_size=deliverers + 2)
    queue = EventRepository(LayeredRepository(transport, CredentialBreaker()))
    endpoint = await queue.add(f"http://127.0.0.1:{port}/", ["transaction.created"], new_secret())
    try:
        conn = await asyncpg.connect(database_url)
        try:
            user = uuid.uuid4()
            await conn.execute("select public.credit_provision_profile($1, '')", user)
            await conn.execute(
                "select public.credit_grant($1, 1, 'bench-' || i, '', '{}')"
                " from generate_series(1, $2) i",
                user,
                events,
            )
        finally:
            await conn.close()
        settings = DeliverySettings(batch=20, idle_seconds=0.01)
        pool = DeliveryPool(queue, deliverers, settings, pump_interval=0.05)
        started = time.monotonic()
        pool.start()
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.monotonic() - started
        await pool.stop(1)
    finally:
        await queue.remove(endpoint.endpoint_id)
        await transport.close()
        await runner.cleanup()
    return events / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__)
    parser.add_argument("--events", type=int, default=EVENTS)
    parser.add_argument("--deliverers", type=int, default=DELIVERERS)
    args = parser.parse_args(argv)
    with servers.migrated_database() as url:
        rate = asyncio.run(measure(url, args.events, args.deliverers))
    print(f"webhook deliveries: {rate:,.0f} events/s ({args.deliverers} deliverers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
