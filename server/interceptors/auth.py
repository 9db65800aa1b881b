"""Who is calling: the one `authorization` value of a call, and which methods need none."""

from __future__ import annotations

from collections.abc import Iterable

from server import errors

PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def is_public(method: str) -> bool:
    """Health checks and reflection are open to anyone (see the contract's principals)."""
    return method.startswith(PUBLIC_METHOD_PREFIXES)


def authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The single `authorization` value; none, several or a binary one count as missing."""
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        raise errors.TokenMissing()
    return values[0]
