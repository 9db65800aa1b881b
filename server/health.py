"""The standard health service (grpc.health.v1), whose Watch streams end once shutdown begins,
and which follows the database (server/db/watch.py tells it when that stops or starts answering).

grpcio-health-checking's servicer keeps every Watch open until the client leaves, so a single
watcher (a load balancer's client-side health check, grpcurl) held a stopping server for its
whole grace period. Here, once shutdown begins, every service reports NOT_SERVING, a watcher is
sent that and its stream ends with OK, and the server stops as soon as its unary calls are done.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._statuses: dict[str, int] = {"": SERVING}
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        sent: int | None = None
        while True:
            async with self._changed:
                while self._status_of(request.service) == sent and not self._shutting_down:
                    await self._changed.wait()
                status, ending = self._status_of(request.service), self._shutting_down
            # Written outside the lock: a slow watcher holds up nobody else.
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if ending:
                return

    async def set(self, service: str, status: int) -> None:
        """Report `service`'s status (ignored once shutdown began)."""
        async with self._changed:
            if not self._shutting_down:
                self._statuses[service] = status
                self._changed.notify_all()

    async def follow_database(self, reachable: bool) -> None:
        """Every service SERVING while the database answers, NOT_SERVING while it does not (a
        load balancer then sends calls to instances that can serve them); ignored once
        shutdown began."""
        status = SERVING if reachable else NOT_SERVING
        async with self._changed:
            if not self._shutting_down:
                self._statuses = dict.fromkeys(self._statuses, status)
                self._changed.notify_all()

    def _status_of(self, service: str) -> int:
        return self._statuses.get(service, SERVICE_UNKNOWN)

    def serving(self) -> bool:
        """True while the server as a whole (service `""`) is SERVING: what the HTTP edge's
        /healthz answers."""
        return self._statuses.get("") == SERVING

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on, and every Watch told so and ended."""
        async with self._changed:
            self._shutting_down = True
            self._statuses = dict.fromkeys(self._statuses, NOT_SERVING)
            self._changed.notify_all()
