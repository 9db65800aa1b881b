"""The HTTP edge's ASGI application: the Connect services by their path prefix
(`/credits.v1.CreditService/<Method>`), `GET /healthz` for HTTP load balancers, and CORS for
the origins allowed (server/edges/cors.py). Anything else is 404.

/healthz answers 200 while the server as a whole is SERVING on gRPC health (server/health.py,
which follows the database: server/db/watch.py), 503 otherwise (starting, database silent,
stopping), with `{"status": "SERVING"}` or `{"status": "NOT_SERVING"}`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from server.edges.cors import Cors, RawHeaders

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_PATH = "/healthz"
_SERVING = b'{"status":"SERVING"}'
_NOT_SERVING = b'{"status":"NOT_SERVING"}'
_JSON = (b"content-type", b"application/json")


class HttpEdge:
    """Routes a request to its service's Connect application, /healthz, or a CORS preflight."""

    def __init__(
        self, services: Mapping[str, ASGIApp], serving: Callable[[], bool], cors: Cors
    ) -> None:
        """`services` by path prefix; `serving()` says whether /healthz answers 200."""
        self._services = dict(services)
        self._serving = serving
        self._cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # uvicorn runs no lifespan, and no websockets here
            return
        path: str = scope["path"]
        if path == HEALTH_PATH:
            await self._health(scope, send)
            return
        origin = _origin(scope) if self._cors.enabled else None
        if origin is not None:
            if scope["method"] == "OPTIONS" and _is_preflight(scope):
                status, headers = self._cors.preflight(origin)
                await _respond(send, status, headers, b"")
                return
            send = _with_headers(send, self._cors.response_headers(origin))
        app = self._services.get(path.rpartition("/")[0])
        if app is None:
            await _respond(send, 404, [], b"")
            return
        await app(scope, receive, send)

    async def _health(self, scope: Scope, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, [(b"allow", b"GET, HEAD")], b"")
            return
        serving = self._serving()
        body = _SERVING if serving else _NOT_SERVING
        headers = [_JSON, (b"cache-control", b"no-store")]
        await _respond(send, 200 if serving else 503, headers, body)


def _origin(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"origin":
            origin: bytes = value
            return origin
    return None


def _is_preflight(scope: Scope) -> bool:
    return any(name == b"access-control-request-method" for name, _ in scope["headers"])


def _with_headers(send: Send, extra: RawHeaders) -> Send:
    """`send`, adding `extra` to the response's headers."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return sending


async def _respond(send: Send, status: int, headers: RawHeaders, body: bytes) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": body})
