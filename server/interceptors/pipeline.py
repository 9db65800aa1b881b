"""What every RPC but health checks and reflection passes: a request id, the caller verified
once and bound as a Principal, errors turned into the contract's statuses, a user's profile
made sure of, and one access-log line at the end.

Each method's handler is guarded once, on its first call, and reused: rebuilding a handler, a
closure and a context manager for every call was a large part of a unary RPC's time here. The
guarded handler takes the request as bytes and parses it only once the caller is known, so a
rejected call never parses its request, and a malformed one gets INVALID_ARGUMENT. It keeps the
original's kind (unary/streaming), so streaming RPCs end with a proper status and
`grpc-status-details-bin` too (the grpc.aio pitfall).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from server import errors
from server.auth.principal import UserPrincipal, bound_principal, set_principal
from server.auth.verifier import TokenVerifier
from server.interceptors import access_log
from server.interceptors.auth import authorization, is_public
from server.interceptors.errors import abort, abort_unexpected
from server.interceptors.handlers import Context, Handler, behaviour_of, rebuild
from server.observability.calls import REQUEST_ID_HEADER, CallRecord, open_call

log = logging.getLogger(__name__)

Parse = Callable[[bytes], Any]
Metadata = Iterable[tuple[str, str | bytes]] | None


class CallInterceptor:
    """Guards the handlers of a server's methods (installed by serving.GuardedServer)."""

    def __init__(
        self,
        verifier: TokenVerifier,
        provision: Callable[[UserPrincipal], Awaitable[None]] | None = None,
    ) -> None:
        """`provision` makes sure a user has a profile; it is awaited as each user's call ends."""
        self._verifier = verifier
        self._provision = provision
        # method -> (the handler as registered, its guarded version)
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    def handler_for(self, method: str, handler: Handler) -> Handler:
        """`handler` as it is served: guarded, unless `method` is public (health, reflection)."""
        if is_public(method):
            return handler
        known = self._guarded.get(method)
        if known is None or known[0] is not handler:
            known = self._guarded[method] = (handler, self._guard(method, handler))
        return known[1]

    def _guard(self, method: str, handler: Handler) -> Handler:
        """`handler` run behind the request id, authentication, the error table and the access
        log; it receives the request unparsed."""
        behaviour = behaviour_of(handler)
        parse: Parse = handler.request_deserializer or _raw
        streaming_requests = handler.request_streaming

        async def admit(metadata: Metadata, record: CallRecord, request: Any) -> Any:
            """The parsed request, once the caller is verified and bound to this call."""
            principal = await self._verifier.authenticate(authorization(metadata))
            record.identify(principal)
            # No reset afterwards: grpc.aio serves each RPC in a task of its own, whose context
            # ends with it.
            set_principal(principal)
            return _parsed_stream(request, parse) if streaming_requests else _parse(parse, request)

        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                metadata = context.invocation_metadata()
                record = _open(method, context, metadata)
                try:
                    admitted = await admit(metadata, record, request)
                    async for response in behaviour(admitted, context):
                        yield response
                    await self._settle()
                except BaseException as error:
                    await self._settle(error)
                    await _end(context, record, error)
                finally:
                    access_log.finish(record)

            return rebuild(handler, stream)
        if not inspect.iscoroutinefunction(behaviour):
            raise TypeError(f"{behaviour!r} is not async; this server serves async handlers only")

        async def call(request: Any, context: Context) -> Any:
            metadata = context.invocation_metadata()
            record = _open(method, context, metadata)
            try:
                response = await behaviour(await admit(metadata, record, request), context)
                await self._settle()
                return response
            except BaseException as error:
                await self._settle(error)
                await _end(context, record, error)
            finally:
                access_log.finish(record)

        return rebuild(handler, call)

    async def _settle(self, error: BaseException | None = None) -> None:
        """A user's first call creates their profile, whatever it asks (the contract). Done as
        the call ends, before its status goes out: most calls have made sure of it by then (so
        it costs nothing), and one that cannot leaves it to the user's next call. Not for a
        call ending by cancellation or an abort (its status is out already), nor by an
        unavailable database (a second wait for it would only double the caller's)."""
        principal = bound_principal()
        if self._provision is None or not isinstance(principal, UserPrincipal):
            return
        if error is not None and (
            not isinstance(error, Exception)
            or isinstance(error, grpc.aio.AbortError | errors.BackendUnavailable)
        ):
            return
        try:
            await self._provision(principal)
        except errors.CreditsError as failed:
            log.warning("the profile of %s is not made yet (%s)", principal.user_id, failed.reason)


def _open(method: str, context: Context, metadata: Metadata) -> CallRecord:
    """The call's record, bound to it, with its request id in the trailers whatever happens."""
    record = CallRecord(access_log.request_id_of(metadata), method)
    open_call(record)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, record.request_id),))
    return record


async def _end(context: Context, record: CallRecord, error: BaseException) -> NoReturn:
    """End the call for what the handler (or the caller's token) raised: a domain error by the
    error table, a bug as INTERNAL; an abort, a cancellation or a generator's close go on."""
    if isinstance(error, errors.CreditsError):
        await abort(context, error)
    elif isinstance(error, asyncio.CancelledError):
        record.fail(grpc.StatusCode.CANCELLED, "")
    elif isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
        await abort_unexpected(context, record.method, error)
    raise error


def _raw(request: bytes) -> bytes:
    return request


def _parse(parse: Parse, request: bytes) -> Any:
    try:
        return parse(request)
    except DecodeError:
        raise errors.InvalidArgument([], "the request is not a valid message") from None


async def _parsed_stream(requests: AsyncIterator[bytes], parse: Parse) -> AsyncIterator[Any]:
    async for request in requests:
        yield _parse(parse, request)
