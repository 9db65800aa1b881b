"""What every RPC but health checks and reflection passes: a request id, the caller verified
once and bound as a Principal, the call run through the profile keeper (server/credit/
profiles.py), errors turned into the contract's statuses, and one access-log line at the end.

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

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from server import errors, runtime
from server.auth.principal import Principal, set_principal
from server.auth.verifier import TokenVerifier
from server.credit.profiles import ProfileKeeper
from server.interceptors import access_log
from server.interceptors.auth import authorization, is_public
from server.interceptors.errors import (
    ResponseTooLarge,
    abort,
    abort_too_large,
    abort_unexpected,
)
from server.interceptors.handlers import Context, Handler, behaviour_of, rebuild
from server.observability.calls import REQUEST_ID_HEADER, CallRecord, open_call

Parse = Callable[[bytes], Any]
Serialize = Callable[[Any], bytes]
Metadata = Iterable[tuple[str, str | bytes]] | None


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
        self._verifier = verifier
        self._profiles = profiles
        self._max_send_bytes = max_send_bytes
        # method -> (the handler as registered, its guarded version)
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    def handler_for(self, method: str, handler: Handler) -> Handler:
        """`handler` as it is served: guarded, unless `method` is public (health, reflection)."""
        if is_public(method):
            return handler
        known = self._guarded.get(method)
        if known is None or known[0] is not handler:
            guarded = _Guarded(
                method, handler, self._verifier, self._profiles, self._max_send_bytes
            )
            known = self._guarded[method] = (handler, guarded.handler())
        return known[1]


class _Guarded:
    """One method's handler run behind the request id, authentication, the error table and the
    access log; it receives the request unparsed."""

    def __init__(
        self,
        method: str,
        handler: Handler,
        verifier: TokenVerifier,
        profiles: ProfileKeeper | None,
        max_send_bytes: int | None = None,
    ) -> None:
        self._method = method
        self._handler = handler
        self._behaviour = behaviour_of(handler)
        self._parse: Parse = handler.request_deserializer or _raw
        self._serialize: Serialize = handler.response_serializer or _raw
        self._verifier = verifier
        self._profiles = profiles
        self._max_send_bytes = max_send_bytes

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
        record = _open(self._method, context, metadata)
        try:
            principal = await self._admit(metadata, record)
            if self._profiles is None:
                response = await self._behaviour(self._request(request), context)
            else:
                response = await self._profiles.run(
                    principal, lambda: self._behaviour(self._request(request), context)
                )
            return self._payload(response)
        except BaseException as error:
            await _end(context, record, error)
        finally:
            access_log.finish(record)

    async def _stream(self, request: Any, context: Context) -> AsyncIterator[Any]:
        metadata = context.invocation_metadata()
        record = _open(self._method, context, metadata)
        principal: Principal | None = None
        try:
            principal = await self._admit(metadata, record)
            async for response in self._behaviour(self._request(request), context):
                yield self._payload(response)
            await self._settle(principal)
        except BaseException as error:
            await self._settle(principal, error)
            await _end(context, record, error)
        finally:
            access_log.finish(record)

    async def _admit(self, metadata: Metadata, record: CallRecord) -> Principal:
        """The caller, verified and bound to this call."""
        principal = await self._verifier.authenticate(authorization(metadata))
        record.identify(principal)
        # No reset afterwards: grpc.aio serves each RPC in a task of its own, whose context
        # ends with it.
        set_principal(principal)
        return principal

    def _payload(self, response: Any) -> bytes:
        """The response serialized; ResponseTooLarge past the send limit."""
        payload: bytes = self._serialize(response)
        if self._max_send_bytes is not None and len(payload) > self._max_send_bytes:
            raise ResponseTooLarge(len(payload), self._max_send_bytes)
        return payload

    def _request(self, request: Any) -> Any:
        """The request parsed (a stream of them, parsed one by one, for streaming requests)."""
        if self._handler.request_streaming:
            return _parsed_stream(request, self._parse)
        return _parse(self._parse, request)

    async def _settle(
        self, principal: Principal | None, error: BaseException | None = None
    ) -> None:
        if self._profiles is not None and principal is not None:
            await self._profiles.settle(principal, error)


def _open(method: str, context: Context, metadata: Metadata) -> CallRecord:
    """The call's record, bound to it, with its request id in the trailers whatever happens;
    the call's deadline bound too, for the storage steps to fit within (runtime.step_timeout)."""
    record = CallRecord(access_log.request_id_of(metadata), method)
    open_call(record)
    runtime.set_deadline(context.time_remaining())
    context.set_trailing_metadata(((REQUEST_ID_HEADER, record.request_id),))
    return record


async def _end(context: Context, record: CallRecord, error: BaseException) -> NoReturn:
    """End the call for what the handler (or the caller's token) raised: a domain error by the
    error table, a bug as INTERNAL; an abort, a cancellation or a generator's close go on."""
    if isinstance(error, errors.CreditsError):
        await abort(context, error)
    elif isinstance(error, ResponseTooLarge):
        await abort_too_large(context, error)
    elif isinstance(error, asyncio.CancelledError):
        record.fail(grpc.StatusCode.CANCELLED, "")
    elif isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
        await abort_unexpected(context, record.method, error)
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
