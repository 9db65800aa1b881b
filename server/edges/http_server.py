"""The HTTP edge served by uvicorn (httptools) in this process's event loop, beside grpc.aio.

The socket is bound here, as grpc binds its own: SO_REUSEADDR, and SO_REUSEPORT only for the
processes of one `credits serve` (CREDITS_PROCESSES > 1), so port 0 picks a port, and a port
another server holds is refused (serving.ensure_free checks first, for the one-line message).
With CREDITS_TLS_CERT and CREDITS_TLS_KEY the edge speaks HTTPS with the gRPC port's certificate,
and with CREDITS_TLS_CLIENT_CA it asks for client certificates that CA signed, as gRPC does.
uvicorn's own signal handlers are not installed (the service's own SIGTERM handling stops both
edges), nor its logging configuration (its lines go through the service's JSON logs, warnings
and up) or access log (the call pipeline writes the service's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from server.config import host_port
from server.edges.http import ASGIApp
from server.serving import MAX_METADATA_BYTES, AddressUnavailable

# How long an idle keep-alive connection stays open.
KEEP_ALIVE_SECONDS = 60
_STARTED_POLL = 0.005


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key, and the CA of client certificates
    (None: none asked for)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """uvicorn serving an ASGI application on a socket of its own, until `stop`."""

    def __init__(self, server: _Server, task: asyncio.Task[None], sock: socket.socket) -> None:
        self._server = server
        self._task = task
        self.port: int = sock.getsockname()[1]

    @classmethod
    async def start(
        cls, app: ASGIApp, listen: str, *, reuse_port: bool = False, tls: TlsFiles | None = None
    ) -> HttpServer:
        """Serving `app` on `listen` ("host:port"; port 0 picks one) once this returns, over
        TLS with `tls`; AddressUnavailable if the address cannot be bound."""
        sock = bind(listen, reuse_port=reuse_port)
        config = uvicorn.Config(
            app,
            http="httptools",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level=logging.WARNING,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            h11_max_incomplete_event_size=MAX_METADATA_BYTES,
            ssl_certfile=tls.cert if tls else None,
            ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=tls.client_ca if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        server = _Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="http-edge")
        while not server.started:
            if task.done():
                sock.close()
                task.result()  # what stopped it
                raise RuntimeError("the HTTP edge stopped while starting")
            await asyncio.sleep(_STARTED_POLL)
        return cls(server, task, sock)

    async def stop(self, grace: float) -> None:
        """Take no more connections; let requests in flight finish within `grace` seconds, then
        cancel what is left."""
        # uvicorn waits this long for requests in flight (whole seconds) before cancelling them.
        self._server.config.timeout_graceful_shutdown = max(1, math.ceil(grace))
        self._server.should_exit = True
        await self._task


def bind(listen: str, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to `listen`, not yet listening; AddressUnavailable, naming the
    address, if it cannot be bound."""
    host, port = host_port(listen)
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise AddressUnavailable(f"cannot listen on {listen}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise AddressUnavailable(f"cannot listen on {listen}: {error.strerror or error}") from None
    sock.setblocking(False)
    return sock
