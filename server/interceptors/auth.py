"""The auth interceptor: verifies the caller once per RPC and binds its Principal for the handler.

Rejections are handlers of the same kind (unary/streaming) as the real one, so streaming RPCs end
with a proper UNAUTHENTICATED status and `grpc-status-details-bin` too (the grpc.aio pitfall).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import grpc.aio

from server import errors
from server.auth.principal import Principal, reset_principal, set_principal
from server.auth.verifier import TokenVerifier
from server.interceptors.errors import abort
from server.interceptors.handlers import Behaviour, Context, Handler, rebuild, wrap
from server.observability.calls import current_call

PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_log = logging.getLogger(__name__)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every RPC but health checks and reflection (see the contract's principals)."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        try:
            authorization = _authorization(handler_call_details.invocation_metadata)
            principal = await self._verifier.authenticate(authorization)
        except errors.CreditsError as err:
            _log.info("rejected %s: %s", method, err.reason)
            return rebuild(handler, _rejection(err), serializers=False)
        except Exception:
            # A bug or an unexpected library error: report INTERNAL without its text.
            _log.exception("authentication of %s failed unexpectedly", method)
            return rebuild(handler, _rejection(errors.CreditsError()), serializers=False)
        return wrap(handler, lambda context: _bound(principal))


def _authorization(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The single `authorization` value; none, several or a binary one count as missing."""
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        raise errors.TokenMissing()
    return values[0]


def _rejection(err: errors.CreditsError) -> Behaviour:
    """A behaviour that ends the call with `err`'s status (a coroutine fits all four kinds)."""

    async def reject(request: object, context: Context) -> None:
        await abort(context, err)

    return reject


@contextlib.asynccontextmanager
async def _bound(principal: Principal) -> AsyncIterator[None]:
    """`principal` bound to the call's context while the handler runs."""
    token = set_principal(principal)
    record = current_call()
    if record is not None:
        record.identify(principal)
    try:
        yield
    finally:
        # An abandoned async generator is closed later from another context, where the
        # principal was never set: nothing to undo there.
        with contextlib.suppress(ValueError):
            reset_principal(token)
