"""The limit of the transport: a bare grpc.aio server answering GetBalance with no work at all.

It parses the request and serialises a response exactly as the service does, but has no
interceptors, no token check and no database: what is left is the cost of gRPC in Python on
this machine. `python -m bench.echo PORT PROCESSES` serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys

import grpc
import grpc.aio

from credits.v1 import credit_service_pb2
from server import runtime


async def _get_balance(
    request: credit_service_pb2.GetBalanceRequest, context: object
) -> credit_service_pb2.GetBalanceResponse:
    return credit_service_pb2.GetBalanceResponse(user_id=request.user_id, balance=1)


async def _serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    handler = grpc.unary_unary_rpc_method_handler(
        _get_balance,
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


def _run(port: int) -> None:
    runtime.run(_serve(port))  # the service's own event loop


def main() -> None:
    port, processes = int(sys.argv[1]), int(sys.argv[2])
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_run, args=(port,)) for _ in range(processes)]
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
