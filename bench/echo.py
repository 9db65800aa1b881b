"""The limit of the transport: a bare grpc.aio server answering GetBalance with no work at all.

It parses the request and serialises a response exactly as the service does, but has no
interceptors, no token check and no database: what is left is the cost of gRPC in Python on
this machine. With a database URL it also makes one call there per RPC, through the service's
own connection pool, and nothing else: `select 1`, or the service's debit function for a bench
user. Those are the floors of a service that reads or writes the database once per call.

`python -m bench.echo PORT PROCESSES [select1|debit DATABASE_URL]` serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import grpc
import grpc.aio

from bench import users
from credits.v1 import credit_service_pb2
from server import runtime
from server.transports.pool import ConnectionPool

DEBIT = (
    "select public.credit_debit(p_user_id => $1, p_amount => 1, p_idempotency_key => $2,"
    " p_description => 'bench', p_metadata => '{}')"
)


async def _work(mode: str, url: str | None) -> Callable[[int], Awaitable[object]]:
    """What each RPC does besides answering, by mode."""
    if mode == "echo" or url is None:

        async def nothing(n: int) -> None:
            return None

        return nothing

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(url, server_settings={"role": "service_role"})

    pool = await ConnectionPool.open(connect, min_size=2, max_size=10, acquire_timeout=10)

    async def fetchval(query: str, *args: object) -> object:
        conn = await pool.acquire()
        reusable = False
        try:
            value = await conn.fetchval(query, *args)
            reusable = True
            return value
        finally:
            pool.release(conn, reusable=reusable)

    if mode == "select1":
        return lambda n: fetchval("select 1")
    return lambda n: fetchval(DEBIT, users.user_id(n % users.COUNT + 1), uuid.uuid4().hex)


async def _serve(port: int, mode: str, url: str | None) -> None:
    work = await _work(mode, url)
    calls = iter(range(10**12))

    async def get_balance(
        request: credit_service_pb2.GetBalanceRequest, context: object
    ) -> credit_service_pb2.GetBalanceResponse:
        await work(next(calls))
        return credit_service_pb2.GetBalanceResponse(user_id=request.user_id, balance=1)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    handler = grpc.unary_unary_rpc_method_handler(
        get_balance,
        request_deserializer=credit_service_pb2.GetBalanceRequest.FromString,
        response_serializer=credit_service_pb2.GetBalanceResponse.SerializeToString,
    )
    service = credit_service_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {"GetBalance": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(1)


def _run(port: int, mode: str, url: str | None) -> None:
    runtime.run(_serve(port, mode, url))  # the service's own event loop


def main() -> None:
    port, processes = int(sys.argv[1]), int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "echo"
    url = sys.argv[4] if len(sys.argv) > 4 else None
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_run, args=(port, mode, url)) for _ in range(processes)]
    for child in children:
        child.start()

    def stop(*_: object) -> None:
        for child in children:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        child.join()


if __name__ == "__main__":
    main()
