"""The grpc.aio server's channel options and compression, from the settings, and how services
are registered on it.

Option names are gRPC core's channel arguments (grpc_types.h, doc/keepalive.md). Besides what
the settings name, the server accepts client keepalive pings every 10 s or slower, with or
without calls in flight, so a client that keeps its connection alive is not sent GOAWAY
`too_many_pings`; it enforces the stream limit the way HTTP/2 clients expect (queue, not
refuse); and it binds with SO_REUSEPORT so several processes can share the port.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import grpc
import grpc.aio

from server.config import MIB, Settings

# The most often a client may ping an idle connection (gRPC core's default is 5 minutes; grpc-java
# clients may not ask for less than 10 s).
MIN_CLIENT_PING_INTERVAL_MS = 10_000

_COMPRESSION = {
    "none": grpc.Compression.NoCompression,
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
}

ChannelOption = tuple[str, int]


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
        ("grpc.so_reuseport", 1),
    ]


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


class _GenericHandlersOnly:
    """What generated `add_*Servicer_to_server` functions see of the server: methods become
    generic handlers (found by name), never registered ones."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Dropped: the generic handlers just added serve these methods."""


def by_name(server: grpc.aio.Server) -> grpc.aio.Server:
    """`server` for registering services as generic handlers only.

    grpc.aio (1.85) keeps a pending task for each registered method and waits on all of them for
    every RPC it accepts (grpc/grpc#43461): with this service's twenty methods, a large share of
    a unary call's time. Generic handlers serve the same methods without that.
    """
    return cast(grpc.aio.Server, _GenericHandlersOnly(server))
