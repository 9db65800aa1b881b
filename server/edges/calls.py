"""The steps every call of the two services takes, whichever edge it arrives on (gRPC, or
Connect over HTTP): a request id, the caller verified once and bound as a Principal, the call
run through the profile keeper (server/credit/profiles.py), the response held to the send
limit, errors turned into the contract's statuses by the one error table, and one access-log
line and the RPC metrics at the end (never a token, key or prompt).

An edge reads its protocol's headers into (name, value) pairs, calls these steps in order, and
writes the status the way its protocol does (server/interceptors/pipeline.py for gRPC,
server/edges/connect.py for Connect).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from server import errors, runtime
from server.api import error_table
from server.auth.principal import Principal, set_principal
from server.auth.verifier import TokenVerifier
from server.credit.profiles import ProfileKeeper
from server.observability import logs, metrics, tracing
from server.observability.calls import REQUEST_ID_HEADER, CallRecord, open_call

T = TypeVar("T")
# A call's request headers (gRPC metadata), names in lower case.
Headers = Iterable[tuple[str, str | bytes]] | None

log = logging.getLogger(__name__)

MAX_REQUEST_ID_LENGTH = 128

# Made ids: a random prefix per process and a counter, 32 hex digits like a UUID's, unique across
# processes and restarts without uuid4's system call for every id.
_prefix = os.urandom(8).hex()
_made = itertools.count(1)


def _new_prefix() -> None:
    global _prefix
    _prefix = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_prefix)


def request_id_of(headers: Headers) -> str:
    """The caller's `x-request-id` when it is a sane one, otherwise a new id."""
    for key, value in headers or ():
        if key != REQUEST_ID_HEADER or not isinstance(value, str):
            continue
        if 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isprintable():
            return value
    return f"{_prefix}{next(_made):016x}"


def authorization(headers: Headers) -> str | None:
    """The single `authorization` value; none, several or a binary one count as missing."""
    values = [value for key, value in headers or () if key.lower() == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        raise errors.TokenMissing()
    return values[0]


class ResponseTooLarge(Exception):
    """A response is larger than the server may send (CREDITS_MAX_SEND_MESSAGE_BYTES)."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"Sent message larger than max ({size} vs. {limit})")


@dataclass(frozen=True, slots=True)
class Failure:
    """How a call that did not succeed ends: its status code and message, and the domain error
    whose ErrorInfo and details the error table gives (None: a status without details)."""

    code: grpc.StatusCode
    message: str
    error: errors.CreditsError | None = None


class Calls:
    """The call pipeline of one edge (`protocol`, the RPC metrics' label); the edges of a server
    share its verifier and profile keeper."""

    def __init__(
        self,
        verifier: TokenVerifier,
        profiles: ProfileKeeper | None = None,
        *,
        max_send_bytes: int | None = None,
        protocol: str = "grpc",
    ) -> None:
        """`profiles` runs each user's call so that it leaves a profile (None: no database);
        `max_send_bytes` is the server's send limit (None: none)."""
        self._verifier = verifier
        self._profiles = profiles
        self.max_send_bytes = max_send_bytes
        self.protocol = protocol

    def open(self, method: str, headers: Headers, seconds_left: float | None) -> CallRecord:
        """The call's record, bound to it (with the call's deadline, for the storage steps to
        fit within: runtime.step_timeout)."""
        record = CallRecord(request_id_of(headers), method, self.protocol)
        open_call(record)
        runtime.set_deadline(seconds_left)
        if tracing.active:
            tracing.opened(record)
        return record

    async def admit(self, headers: Headers, record: CallRecord) -> Principal:
        """The caller, verified and bound to this call (its context: each call runs in a task
        of its own, whose context ends with it)."""
        principal = await self._verifier.authenticate(authorization(headers))
        record.identify(principal)
        set_principal(principal)
        return principal

    async def run(self, principal: Principal, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` (a unary call's handler) through the profile keeper."""
        if tracing.active:
            call = tracing.domain(call)
        if self._profiles is None:
            return await call()
        return await self._profiles.run(principal, call)

    async def settle(self, principal: Principal | None, error: BaseException | None = None) -> None:
        """A streaming call of `principal` ended (with `error`, if it failed): its profile is
        made sure of as a unary call's is."""
        if self._profiles is not None and principal is not None:
            await self._profiles.settle(principal, error)

    def check_size(self, size: int) -> None:
        """ResponseTooLarge for a response of `size` bytes past the send limit."""
        if self.max_send_bytes is not None and size > self.max_send_bytes:
            raise ResponseTooLarge(size, self.max_send_bytes)

    def failure(self, record: CallRecord, error: BaseException) -> Failure | None:
        """What the caller is told for `error`, noted on the call's record: a domain error by
        the error table, a response too large as RESOURCE_EXHAUSTED without details (as gRPC
        makes it), a bug or an unexpected library error as INTERNAL with no internals in the
        message (and its traceback in the log). None for a cancellation (noted CANCELLED) and
        anything else that is no Exception: the caller is gone or the task is ending."""
        if isinstance(error, errors.CreditsError):
            code = error_table.code_of(error)
            record.fail(code, error.reason)
            return Failure(code, error.message, error)
        if isinstance(error, ResponseTooLarge):
            record.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "")
            return Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        if isinstance(error, asyncio.CancelledError):
            record.fail(grpc.StatusCode.CANCELLED, "")
            return None
        if not isinstance(error, Exception):
            return None
        log.error(
            "unexpected error in %s (request %s)", record.method, record.request_id, exc_info=error
        )
        internal = errors.CreditsError()
        record.fail(grpc.StatusCode.INTERNAL, internal.reason)
        return Failure(grpc.StatusCode.INTERNAL, internal.message, internal)


def finish(record: CallRecord) -> None:
    """The call is over: its access-log line and its metrics."""
    code = record.code.name
    if tracing.active:
        tracing.ended(record)
    logs.access(f"rpc {record.method} {code}", record.fields())
    metrics.rpc_done(record.method, code, record.elapsed(), record.protocol)
    if record.reason:
        metrics.rpc_failed(record.method, record.reason)
