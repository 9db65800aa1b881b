"""The grpc.aio server's channel options and compression, from the settings, and the server
services are registered on, which guards every method.

Option names are gRPC core's channel arguments (grpc_types.h, doc/keepalive.md). Besides what
the settings name, the server accepts client keepalive pings every 10 s or slower, with or
without calls in flight, so a client that keeps its connection alive is not sent GOAWAY
`too_many_pings`; it enforces the stream limit the way HTTP/2 clients expect (queue, not
refuse). Only the processes of one `credits serve` share a port (SO_REUSEPORT, when
CREDITS_PROCESSES > 1): any other server that asks for a port in use is refused, never started
beside the one already there with the kernel splitting connections between them. Request
metadata is accepted up to MAX_METADATA_BYTES, every time.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import grpc.aio

from server.config import MIB, Settings, host_port
from server.interceptors import CallInterceptor

# The most often a client may ping an idle connection (gRPC core's default is 5 minutes; grpc-java
# clients may not ask for less than 10 s).
MIN_CLIENT_PING_INTERVAL_MS = 10_000

_COMPRESSION = {
    "none": grpc.Compression.NoCompression,
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
}

ChannelOption = tuple[str, int]

# The largest request metadata (HTTP/2 header list) accepted, twice the largest token the
# verifier takes (auth/verifier.py), so a longer token reaches it and is refused as
# TOKEN_INVALID. gRPC core's defaults refuse metadata past a soft limit of 8 KiB at random, and
# all past 16 KiB, with RESOURCE_EXHAUSTED and no ErrorInfo: with the soft limit equal to the
# hard one, nothing is refused at random.
MAX_METADATA_BYTES = 64 * 1024


def channel_options(settings: Settings) -> list[ChannelOption]:
    """The server's channel arguments for `settings`."""
    return [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
        ("grpc.keepalive_time_ms", settings.keepalive_seconds * 1000),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_seconds * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Count streams as HTTP/2 does. gRPC core's default "overload protection" also counts
        # streams the client already saw finish, and refuses new ones (RST_STREAM
        # REFUSED_STREAM, an UNAVAILABLE error) from a client that keeps within the limit;
        # without it, calls above the limit wait in the client for a free stream.
        ("grpc.http.overload_protection", 0),
        # grpc's default is 1: a second server would then bind the port beside this one.
        ("grpc.so_reuseport", 1 if settings.processes > 1 else 0),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    ]


class AddressUnavailable(Exception):
    """The address a server is to listen on is taken (or cannot be bound); the message names
    it."""


def ensure_free(listen: str) -> None:
    """Refuse (AddressUnavailable) a host:port something already holds: another server
    listening there, or any socket bound to it. Port 0 is always free.

    The probe binds with SO_REUSEADDR and without SO_REUSEPORT, as grpc binds a server of one
    process: any socket bound to the port refuses it, but connections a server left in
    TIME_WAIT do not.
    """
    host, port = host_port(listen)
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as error:
        raise AddressUnavailable(f"cannot listen on {listen}: {error.strerror or error}") from None
    for family, kind, proto, _name, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # an address family this host lacks (IPv6, say): grpc skips it too
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRNOTAVAIL:
                    continue  # an address family this host lacks (IPv6, say): grpc skips it too
                if error.errno == errno.EADDRINUSE:
                    raise AddressUnavailable(
                        f"cannot listen on {listen}: the address is already in use "
                        "(another server?)"
                    ) from None
                raise AddressUnavailable(f"cannot listen on {listen}: {error.strerror}") from None


def compression(settings: Settings) -> grpc.Compression:
    """How the server compresses its responses (`CREDITS_COMPRESSION`)."""
    return _COMPRESSION[settings.compression]


def describe(settings: Settings) -> str:
    """The serving options in one line, for `credits check-config`."""
    processes = f"{settings.processes} process{'es' if settings.processes > 1 else ''}"
    return (
        f"{processes}; messages up to "
        f"{_size(settings.max_receive_message_bytes)} in, "
        f"{_size(settings.max_send_message_bytes)} out; keepalive every "
        f"{settings.keepalive_seconds} s (timeout {settings.keepalive_timeout_seconds} s); "
        f"{settings.max_concurrent_streams} streams per connection; "
        f"compression {settings.compression}"
    )


def _size(count: int) -> str:
    mib, rest = divmod(count, MIB)
    return f"{mib} MiB" if mib and not rest else f"{count} bytes"


class GuardedServer(grpc.aio.Server):
    """A grpc.aio server whose every method, however registered, is served through the call
    interceptor (health and reflection pass it untouched).

    Guarding the handlers where they are registered, instead of with a grpc.aio
    ServerInterceptor, spares every RPC the interceptor chain's coroutines, and no registration
    can bypass it. Methods are registered as generic handlers only (found by name):
    grpc.aio (1.85) keeps a pending task for each *registered* method and waits on all of them
    for every RPC it accepts (grpc/grpc#43461), and the generated `add_*_to_server` functions
    register each method both ways.
    """

    def __init__(self, server: grpc.aio.Server, interceptor: CallInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            [_Guarded(handlers, self._interceptor) for handlers in generic_rpc_handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Dropped: every caller of this registers the same methods as generic handlers too."""

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    # grpc.aio's own signature, timeout parameter included.
    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        return await self._server.wait_for_termination(timeout)


class _Guarded(grpc.GenericRpcHandler):
    def __init__(self, handlers: grpc.GenericRpcHandler, interceptor: CallInterceptor) -> None:
        self._handlers = handlers
        self._interceptor = interceptor

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._handlers.service(handler_call_details)
        if handler is None:
            return None
        return self._interceptor.handler_for(handler_call_details.method, handler)
