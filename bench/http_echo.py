"""The limit of the HTTP edge's server: a bare ASGI application under the same uvicorn as the
Connect edge (server/edges/http_server.py: httptools, the service's event loop, SO_REUSEPORT),
answering every POST with a small fixed JSON body once it has read the request's. No Connect
runtime, codec, token check or database: what is left is the cost of HTTP in Python here.

`python -m bench.http_echo PORT PROCESSES` serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys

from server import runtime
from server.edges.http import Message, Receive, Scope, Send
from server.edges.http_server import HttpServer

BODY = b'{"userId":"","balance":"1","held":"0","available":"1"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message: Message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def _serve(port: int) -> None:
    server = await HttpServer.start(echo, f"127.0.0.1:{port}", reuse_port=True)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(1)


def _run(port: int) -> None:
    runtime.run(_serve(port))


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
