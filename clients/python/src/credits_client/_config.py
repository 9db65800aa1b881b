"""Channel settings both clients share: the retry policy (a gRPC service config), the default
deadline, and TLS."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import grpc.aio

DEFAULT_TIMEOUT = 10.0
"""Seconds a unary call may take, retries included, unless the call says otherwise."""

DEFAULT_MAX_ATTEMPTS = 4
"""Attempts per call when the service is UNAVAILABLE (gRPC caps this at 5)."""

SERVICES = ("credits.v1.CreditService", "credits.v1.GenerationService")

MAX_METADATA_BYTES = 64 * 1024
"""The largest metadata (headers, trailers) the channel accepts, as the service accepts it.

gRPC's defaults refuse metadata past 8 KiB at random and all of it past 16 KiB; the soft limit
equal to the hard one refuses nothing at random. (What a call *sends* is judged by the server:
it takes tokens up to 32 KiB.)"""

ChannelOptions: TypeAlias = Sequence[tuple[str, Any]]


def service_config(max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> dict[str, Any]:
    """The gRPC service config: UNAVAILABLE is retried with exponential backoff.

    gRPC retries a call only when the server did not process it or answered UNAVAILABLE, and
    every mutation carries an idempotency key, so a retried mutation takes effect once.
    ``max_attempts`` of 1 turns retries off.
    """
    if not 1 <= max_attempts <= 5:
        raise ValueError("max_attempts must be between 1 and 5")
    method: dict[str, Any] = {"name": [{"service": name} for name in SERVICES]}
    if max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return {"methodConfig": [method]}


def channel_options(
    max_attempts: int = DEFAULT_MAX_ATTEMPTS, extra: ChannelOptions = ()
) -> list[tuple[str, Any]]:
    """Channel options with the retry policy and the metadata limits; `extra` options come
    last and win."""
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
        ("grpc.service_config", json.dumps(service_config(max_attempts))),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    ]
    return [*options, *extra]


def _read(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes from bytes, or from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class TLS:
    """TLS settings of a channel.

    ``TLS()`` verifies the server against the system's root certificates. Give
    ``root_certificates`` (PEM bytes or a file path) for a private CA, and ``private_key`` with
    ``certificate_chain`` for a client certificate (mutual TLS).
    """

    root_certificates: bytes | str | Path | None = None
    private_key: bytes | str | Path | None = field(default=None, repr=False)
    certificate_chain: bytes | str | Path | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("a client certificate needs both private_key and certificate_chain")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials of these settings."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=_read(self.private_key),
            certificate_chain=_read(self.certificate_chain),
        )


def tls_settings(tls: TLS | bool) -> TLS | None:
    """`tls` as settings: True means system roots, False plaintext."""
    if isinstance(tls, TLS):
        return tls
    return TLS() if tls else None


def open_channel(target: str, tls: TLS | bool, options: ChannelOptions) -> grpc.Channel:
    """A blocking channel to `target`, plaintext or TLS."""
    settings = tls_settings(tls)
    if settings is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, settings.channel_credentials(), options=options)


def open_aio_channel(target: str, tls: TLS | bool, options: ChannelOptions) -> grpc.aio.Channel:
    """An asyncio channel to `target`, plaintext or TLS."""
    settings = tls_settings(tls)
    if settings is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, settings.channel_credentials(), options=options)
