"""Rebuilding RPC method handlers around a wrapped behaviour, keeping their kind.

A replacement must have the same request/response streaming flags as the handler it stands for,
or streaming calls break (the grpc.aio pitfall). All of this service's handlers are async: a
coroutine, or an async generator for server-streaming responses.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

import grpc
import grpc.aio

# The grpc stubs make RpcMethodHandler generic; at runtime it is not, hence the string.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Behaviour = Callable[..., Any]
Around = Callable[[Context], AbstractAsyncContextManager[None]]


def behaviour_of(handler: Handler) -> Behaviour:
    behaviour = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if behaviour is None:
        raise TypeError("method handler has no behaviour")
    return behaviour


def rebuild(handler: Handler, behaviour: Behaviour, *, serializers: bool = True) -> Handler:
    """A handler of `handler`'s kind running `behaviour`; without (de)serializers on request
    (a rejection never parses the request)."""
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


def wrap(handler: Handler, around: Around) -> Handler:
    """`handler` with `around(context)` entered for the whole of each call."""
    behaviour = behaviour_of(handler)
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            async with around(context):
                async for response in behaviour(request, context):
                    yield response

        return rebuild(handler, stream)
    if inspect.iscoroutinefunction(behaviour):

        async def call(request: Any, context: Context) -> Any:
            async with around(context):
                return await behaviour(request, context)

        return rebuild(handler, call)
    raise TypeError(f"{behaviour!r} is not async; this server serves async handlers only")
