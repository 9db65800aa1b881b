"""Server reflection (grpc.reflection.v1alpha) that also resolves method names.

grpcio-reflection asks the protobuf descriptor pool for the file containing a symbol, and the
pool knows services and messages but not their methods, so `grpcurl describe
credits.v1.CreditService.GetBalance` answered "Symbol not found". A method's file is its
service's: such a request is answered as for the service, echoing the request as asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, cast

import grpc.aio
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as _Answers

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse
# What grpcio-reflection's ServerReflectionInfo is (its stubs type it as a coroutine).
Answer = Callable[[AsyncIterable[Request], Any], AsyncIterator[Response]]


class ReflectionServicer(reflection_pb2_grpc.ServerReflectionServicer):
    def __init__(self, service_names: Iterable[str]) -> None:
        self._answer = cast(Answer, _Answers(service_names).ServerReflectionInfo)

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterable[Request], context: Any
    ) -> AsyncIterator[Response]:
        async for request in request_iterator:
            service = _service_of_method(request.file_containing_symbol)
            asked = request if service is None else Request(file_containing_symbol=service)
            async for response in self._answer(_one(asked), context):
                response.original_request.CopyFrom(request)
                yield response


def _service_of_method(symbol: str) -> str | None:
    """The service `symbol` names a method of, if it does."""
    service, _, method = symbol.rpartition(".")
    if not service:
        return None
    try:
        found = descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        return None
    return service if method in found.methods_by_name else None


async def _one(request: Request) -> AsyncIterator[Request]:
    yield request


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection for `service_names` (and reflection itself) on `server`."""
    names = (*service_names, reflection.SERVICE_NAME)
    # grpcio-reflection's stubs leave this untyped.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        ReflectionServicer(names), server
    )
