"""The gRPC edge's call pipeline: every RPC but health checks and reflection passes the steps
of server/edges/calls.py (a request id, the caller verified once and bound as a Principal, the
call run through the profile keeper, errors turned into the contract's statuses, one access-log
line at the end); this module runs them around grpc.aio's handlers.

Each method's handler is guarded once, on its first call, and reused: rebuilding a handler, a
closure and a context manager for every call was a large part of a unary RPC's time here. The
guarded handler takes the request as bytes and parses it only once the caller is known, so a
rejected call never parses its request, and a malformed one gets INVALID_ARGUMENT. It keeps the
original's kind (unary/streaming), so streaming RPCs end with a proper status and
`grpc-status-details-bin` too (the grpc.aio pitfall).

The guarded handler also serializes the responses itself, and refuses one larger than the
server's send limit with RESOURCE_EXHAUSTED, as gRPC core would, so that the access log records
the status the caller got: when core refuses to send a response, grpc.aio tells the handler
nothing (context.code() stays None), and the log said OK.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from server import errors
from server.auth.principal import Principal
from server.auth.verifier import TokenVerifier
from server.credit.profiles import ProfileKeeper
from server.edges import calls
from server.edges.calls import Calls
from server.interceptors.auth import is_public
from server.interceptors.errors import abort
from server.interceptors.handlers import Context, Handler, behaviour_of, rebuild
from server.observability.calls import REQUEST_ID_HEADER, CallRecord

Parse = Callable[[bytes], Any]
Serialize = Callable[[Any], bytes]


class CallInterceptor:
    """Guards the handlers of a server's methods (installed by serving.GuardedServer)."""

    def __init__(
        self,
        verifier: TokenVerifier,
        profiles: ProfileKeeper | None = None,
        *,
        max_send_bytes: int | None = None,
    ) -> None:
        """`profiles` runs each user's call so that it leaves a profile (None: no database);
        `max_send_bytes` is the server's send limit (None: none)."""
        self._calls = Calls(verifier, profiles, max_send_bytes=max_send_bytes, protocol="grpc")
        # method -> (the handler as registered, its guarded version)
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    def handler_for(self, method: str, handler: Handler) -> Handler:
        """`handler` as it is served: guarded, unless `method` is public (health, reflection)."""
        if is_public(method):
            return handler
        known = self._guarded.get(method)
        if known is None or known[0] is not handler:
            guarded = _Guarded(method, handler, self._calls)
            known = self._guarded[method] = (handler, guarded.handler())
        return known[1]


class _Guarded:
    """One method's handler run through the call pipeline; it receives the request unparsed."""

    def __init__(self, method: str, handler: Handler, pipeline: Calls) -> None:
        self._method = method
        self._handler = handler
        self._behaviour = behaviour_of(handler)
        self._parse: Parse = handler.request_deserializer or _raw
        self._serialize: Serialize = handler.response_serializer or _raw
        self._calls = pipeline

    def handler(self) -> Handler:
        if inspect.isasyncgenfunction(self._behaviour):
            return rebuild(self._handler, self._stream)
        if not inspect.iscoroutinefunction(self._behaviour):
            raise TypeError(
                f"{self._behaviour!r} is not async; this server serves async handlers only"
            )
        return rebuild(self._handler, self._unary)

    async def _unary(self, request: Any, context: Context) -> Any:
        metadata = context.invocation_metadata()
        record = self._open(context, metadata)
        try:
            principal = await self._calls.admit(metadata, record)
            response = await self._calls.run(
                principal, lambda: self._behaviour(self._request(request), context)
            )
            payload = self._payload(response)
        except BaseException as error:
            await self._end(context, record, error)
        calls.finish(record)
        return payload

    async def _stream(self, request: Any, context: Context) -> AsyncIterator[Any]:
        metadata = context.invocation_metadata()
        record = self._open(context, metadata)
        principal: Principal | None = None
        try:
            principal = await self._calls.admit(metadata, record)
            async for response in self._behaviour(self._request(request), context):
                yield self._payload(response)
            await self._calls.settle(principal)
        except BaseException as error:
            await self._calls.settle(principal, error)
            await self._end(context, record, error)
        calls.finish(record)

    def _open(self, context: Context, metadata: calls.Headers) -> CallRecord:
        """The call's record, with its request id in the trailers whatever happens."""
        record = self._calls.open(self._method, metadata, context.time_remaining())
        context.set_trailing_metadata(((REQUEST_ID_HEADER, record.request_id),))
        return record

    def _payload(self, response: Any) -> bytes:
        """The response serialized; ResponseTooLarge past the send limit."""
        payload: bytes = self._serialize(response)
        self._calls.check_size(len(payload))
        return payload

    def _request(self, request: Any) -> Any:
        """The request parsed (a stream of them, parsed one by one, for streaming requests)."""
        if self._handler.request_streaming:
            return _parsed_stream(request, self._parse)
        return _parse(self._parse, request)

    async def _end(self, context: Context, record: CallRecord, error: BaseException) -> NoReturn:
        """End the call for what the handler (or the caller's token) raised, as the pipeline
        says; grpc.aio's own abort, a cancellation or a generator's close go on. The access
        line is written first: the status reaches the caller as abort sends it."""
        failure = None
        if not isinstance(error, grpc.aio.AbortError):
            failure = self._calls.failure(record, error)
        calls.finish(record)
        if failure is not None:
            await abort(context, record, failure)
        raise error


def _raw(message: bytes) -> bytes:
    return message


def _parse(parse: Parse, request: bytes) -> Any:
    try:
        return parse(request)
    except DecodeError:
        raise errors.InvalidArgument([], "the request is not a valid message") from None


async def _parsed_stream(requests: AsyncIterator[bytes], parse: Parse) -> AsyncIterator[Any]:
    async for request in requests:
        yield _parse(parse, request)
