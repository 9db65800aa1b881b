"""Which gRPC methods need no token (the caller's token itself is read by server/edges/calls.py)."""

from __future__ import annotations

PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def is_public(method: str) -> bool:
    """Health checks and reflection are open to anyone (see the contract's principals)."""
    return method.startswith(PUBLIC_METHOD_PREFIXES)
