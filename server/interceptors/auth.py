"""The auth interceptor: verifies the caller once per RPC and binds its Principal for the handler.

Rejections are handlers of the same kind (unary/streaming) as the real one, so streaming RPCs end
with a proper UNAUTHENTICATED status and `grpc-status-details-bin` too (the grpc.aio pitfall).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeAlias

import grpc
import grpc.aio

from server import errors
from server.api import error_table
from server.auth.principal import Principal, reset_principal, set_principal
from server.auth.verifier import TokenVerifier

PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# The grpc stubs make RpcMethodHandler generic; at runtime it is not, hence the string.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behaviour = Callable[..., Any]

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
            return _rebuild(handler, _rejection(err), serializers=False)
        except Exception:
            # A bug or an unexpected library error: report INTERNAL without its text.
            _log.exception("authentication of %s failed unexpectedly", method)
            return _rebuild(handler, _rejection(errors.CreditsError()), serializers=False)
        return _rebuild(handler, _bind(_behaviour(handler), principal), serializers=True)


def _authorization(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The single `authorization` value; none, several or a binary one count as missing."""
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        raise errors.TokenMissing()
    return values[0]


def _behaviour(handler: Handler) -> Behaviour:
    behaviour = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if behaviour is None:
        raise TypeError("method handler has no behaviour")
    return behaviour


def _rebuild(handler: Handler, behaviour: Behaviour, *, serializers: bool) -> Handler:
    """A handler of `handler`'s kind running `behaviour`.

    A rejection gets no (de)serializers: an unauthenticated request is never parsed.
    """
    deserializer = handler.request_deserializer if serializers else None
    serializer = handler.response_serializer if serializers else None
    match handler.request_streaming, handler.response_streaming:
        case False, False:
            factory = grpc.unary_unary_rpc_method_handler
        case False, True:
            factory = grpc.unary_stream_rpc_method_handler
        case True, False:
            factory = grpc.stream_unary_rpc_method_handler
        case _:
            factory = grpc.stream_stream_rpc_method_handler
    return factory(behaviour, request_deserializer=deserializer, response_serializer=serializer)


def _rejection(err: errors.CreditsError) -> Behaviour:
    """A behaviour that ends the call with `err`'s status (a coroutine fits all four kinds)."""
    status = error_table.to_status(err)

    async def reject(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort_with_status(status)

    return reject


def _bind(behaviour: Behaviour, principal: Principal) -> Behaviour:
    """`behaviour` with `principal` bound while it runs, of the same sync/async kind.

    The server picks how to run a behaviour by inspecting it, so the wrapper must look alike:
    coroutine, async generator, or plain function (run in the server's thread pool).
    """
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            token = set_principal(principal)
            try:
                async for response in behaviour(request, context):
                    yield response
            finally:
                _reset(token)

        return stream

    if inspect.iscoroutinefunction(behaviour):

        async def call(request: Any, context: Any) -> Any:
            token = set_principal(principal)
            try:
                return await behaviour(request, context)
            finally:
                _reset(token)

        return call

    def sync_call(request: Any, context: Any) -> Any:
        token = set_principal(principal)
        try:
            result = behaviour(request, context)
        finally:
            _reset(token)
        # A sync streaming behaviour returns an iterator the server steps through in its pool.
        return _bound_steps(result, principal) if isinstance(result, Iterator) else result

    return sync_call


def _bound_steps(responses: Iterator[Any], principal: Principal) -> Iterator[Any]:
    """Steps `responses` with `principal` bound during each step (steps may run on any thread)."""
    while True:
        token = set_principal(principal)
        try:
            response = next(responses)
        except StopIteration:
            return
        finally:
            _reset(token)
        yield response


def _reset(token: contextvars.Token[Principal | None]) -> None:
    # An abandoned async generator is closed later from another context, where the principal
    # was never set: nothing to undo there.
    with contextlib.suppress(ValueError):
        reset_principal(token)
