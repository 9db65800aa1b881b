"""Turns what a handler raises into the contract's status: domain errors through the one error
table, anything else into INTERNAL with no internals in the message and a logged traceback."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias, cast

import grpc
import grpc.aio

from server import errors
from server.api import error_table

log = logging.getLogger(__name__)

# The stubs make RpcMethodHandler generic; at runtime it is not, hence the string.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context = grpc.aio.ServicerContext[Any, Any]
# Our servicers are all async; the stubs type handler behaviours as sync callables.
AsyncUnary = Callable[[Any, Context], Awaitable[Any]]
AsyncStream = Callable[[Any, Context], AsyncIterator[Any]]

REQUEST_ID_HEADER = "x-request-id"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        request_id = _request_id(handler_call_details.invocation_metadata)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(cast(AsyncUnary, handler.unary_unary), method, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _stream(cast(AsyncStream, handler.unary_stream), method, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _request_id(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


async def _report(error: BaseException, context: Context, method: str, request_id: str) -> None:
    if isinstance(error, errors.CreditsError):
        status = error_table.to_status(error)
    else:
        log.error("unexpected error in %s (request %s)", method, request_id, exc_info=error)
        status = error_table.to_status(errors.CreditsError())
    context.set_trailing_metadata((*status.trailing_metadata, (REQUEST_ID_HEADER, request_id)))
    await context.abort(status.code, status.details)


def _unary(behaviour: AsyncUnary, method: str, request_id: str) -> AsyncUnary:
    async def call(request: Any, context: Context) -> Any:
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _report(error, context, method, request_id)

    return call


def _stream(behaviour: AsyncStream, method: str, request_id: str) -> AsyncStream:
    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for response in behaviour(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _report(error, context, method, request_id)

    return call
