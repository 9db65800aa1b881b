"""RPC method handlers: their behaviour, and a handler of the same kind around another behaviour.

A replacement must have the same request/response streaming flags as the handler it stands for,
or streaming calls break (the grpc.aio pitfall). All of this service's handlers are async: a
coroutine, or an async generator for server-streaming responses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import grpc
import grpc.aio

# The grpc stubs make RpcMethodHandler generic; at runtime it is not, hence the string.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Behaviour = Callable[..., Any]


def behaviour_of(handler: Handler) -> Behaviour:
    behaviour = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if behaviour is None:
        raise TypeError("method handler has no behaviour")
    return behaviour


def rebuild(handler: Handler, behaviour: Behaviour) -> Handler:
    """A handler of `handler`'s kind running `behaviour`, which receives requests unparsed and
    returns (or yields) responses serialized."""
    match handler.request_streaming, handler.response_streaming:
        case False, False:
            factory = grpc.unary_unary_rpc_method_handler
        case False, True:
            factory = grpc.unary_stream_rpc_method_handler
        case True, False:
            factory = grpc.stream_unary_rpc_method_handler
        case _:
            factory = grpc.stream_stream_rpc_method_handler
    return factory(behaviour)
