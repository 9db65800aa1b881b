"""The direct PostgreSQL transport (asyncpg).

Pooled connections run as `service_role` (the service layer). The user layer runs each call in
a transaction as role `authenticated` with `request.jwt.claims` set, exactly as PostgREST does,
so row-level security sees what it would see for a Supabase client. While the pool is busy, the
service layer's calls of a function with a batched form go to the database together
(server/transports/batching.py).

Every call is given the configured timeout (CREDITS_DB_TIMEOUT_SECONDS), or less when the RPC
it serves must be answered sooner (runtime.step_timeout), to get a connection and its answer:
a database that does not answer in time is BACKEND_UNAVAILABLE, never the caller's deadline.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from server import runtime
from server.auth.principal import UserPrincipal
from server.errors import BackendUnavailable
from server.observability import metrics
from server.repository.functions import SqlCall
from server.repository.transport import CredentialsRejected
from server.transports import json_values
from server.transports.batching import MAX_OUT, MAX_OUT_READS, Batcher, Values
from server.transports.pool import ConnectionPool, PoolClosed, reusable_after
from server.transports.sql_errors import domain_error, is_transient

# SQLSTATE class 28: invalid authorization.
_CREDENTIALS_CLASS = "28"
# What a call can meet below the domain: asyncpg's PostgresError (a lost connection among them:
# ConnectionDoesNotExistError is one, of class 08), the socket's, a timeout, and asyncpg's own
# broken state (InternalClientError: a protocol left mid-operation).
_DRIVER_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InternalClientError)

_SET_USER_CONTEXT = (
    "select pg_catalog.set_config('role', 'authenticated', true), "
    "pg_catalog.set_config('request.jwt.claims', $1, true)"
)


Declared = type[SqlCall[Any]]

# What the database says beside its answers: a WARNING (credit_expire_holds names each user it
# skipped this way) goes into the service's log, not only the database's.
database_log = logging.getLogger("credits.database")


def _log_warning(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
    if isinstance(message, asyncpg.PostgresWarning):
        database_log.warning("database: %s", message.message)
        metrics.DATABASE_WARNINGS.inc()


# Both rendered from the declarations in server/repository/functions.py only, once each.
_statements: dict[Declared, str] = {}
_each_statements: dict[Declared, str] = {}


def _statement(declared: Declared) -> str:
    statement = _statements.get(declared)
    if statement is None:
        statement = f"select public.{declared.function}({_arguments(declared.params())})"
        _statements[declared] = statement
    return statement


def _each_statement(declared: Declared) -> str:
    statement = _each_statements.get(declared)
    if statement is None:
        columns = "ordinal, result, error_code, error_message, error_detail"
        arguments = _arguments(declared.batched_params())
        statement = f"select {columns} from public.{declared.batched}({arguments})"  # noqa: S608
        _each_statements[declared] = statement
    return statement


def _arguments(params: Sequence[str]) -> str:
    return ", ".join(f"{param} => ${i}" for i, param in enumerate(params, start=1))


# The default of CREDITS_DB_TIMEOUT_SECONDS: well under the deadlines callers use (the Python
# client's default is 10 s), so that they hear BACKEND_UNAVAILABLE and its RetryInfo.
DEFAULT_TIMEOUT = 3.0


class PostgresTransport:
    """A connection pool, the two layers over it, and the probe health follows."""

    def __init__(self, pool: ConnectionPool, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._pool = pool
        self._url = url
        self._timeout = timeout
        self._service = _ServiceSession(pool, timeout)
        self._probe_conn: asyncpg.Connection | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        timeout_seconds: float = DEFAULT_TIMEOUT,
    ) -> PostgresTransport:
        """A pool of up to `max_size` connections to `url`, `min_size` of them opened now; a
        call gets `timeout_seconds` (less near its deadline) for a connection and its answer."""
        timeout = timeout_seconds

        async def connect() -> asyncpg.Connection:
            try:
                conn = await asyncpg.connect(
                    url,
                    timeout=timeout,
                    command_timeout=timeout,
                    server_settings={"role": "service_role", "application_name": "credits"},
                )
            except _DRIVER_ERRORS as exc:
                raise _translate(exc) from exc
            conn.add_log_listener(_log_warning)
            try:
                for type_name in ("json", "jsonb"):
                    await conn.set_type_codec(
                        type_name,
                        encoder=json.dumps,
                        decoder=json_values.loads,
                        schema="pg_catalog",
                    )
            except BaseException as exc:
                conn.terminate()  # half set up: never handed out
                if isinstance(exc, _DRIVER_ERRORS):
                    raise _translate(exc) from exc
                raise
            return conn

        pool = await ConnectionPool.open(
            connect, min_size=min_size, max_size=max_size, acquire_timeout=timeout
        )
        metrics.watch_pool(pool.size, pool.idle)
        return cls(pool, url, timeout)

    def service(self) -> _ServiceSession:
        return self._service

    def as_user(self, principal: UserPrincipal) -> _Session:
        return _Session(self._pool, self._timeout, json.dumps(dict(principal.claims)))

    async def probe(self, within: float) -> None:
        """`select 1` answered within `within` seconds, or BackendUnavailable. On a connection
        of its own, never a pooled one: a busy pool is neither mistaken for a lost database
        nor kept waiting by the check."""
        try:
            if self._probe_conn is None or self._probe_conn.is_closed():
                self._probe_conn = None
                self._probe_conn = await asyncpg.connect(
                    self._url,
                    timeout=within,
                    server_settings={"application_name": "credits-probe"},
                )
            await self._probe_conn.fetchval("select 1", timeout=within)
        except (*_DRIVER_ERRORS, asyncpg.InterfaceError) as exc:
            if self._probe_conn is not None:
                self._probe_conn.terminate()
                self._probe_conn = None
            raise BackendUnavailable() from exc

    async def close(self) -> None:
        if self._probe_conn is not None:
            self._probe_conn.terminate()
            self._probe_conn = None
        await self._pool.close()


class _Session:
    def __init__(self, pool: ConnectionPool, timeout: float, claims: str | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._claims = claims

    async def call(self, call: SqlCall[Any]) -> Any:
        timeout = runtime.step_timeout(self._timeout)
        declared = type(call)
        return await self._run(_statement(declared), call.values(), timeout, declared.ahead)

    async def _run(self, statement: str, values: Values, within: float, ahead: bool = False) -> Any:
        """`statement`'s value, with a connection and the answer within `within` seconds
        (`ahead`: the connection before every call waiting for one)."""
        until = time.monotonic() + within
        try:
            conn = await self._pool.acquire(within, first=ahead)
        except (PoolClosed, TimeoutError):
            raise BackendUnavailable() from None
        # Back to the pool only after the server answered: a result, or an SQL error.
        reusable = False
        try:
            if self._claims is None:
                result = await conn.fetchval(statement, *values, timeout=until - time.monotonic())
            else:
                result = await self._as_user(conn, statement, values, until)
            reusable = True
            return result
        except asyncpg.PostgresError as exc:
            reusable = reusable_after(exc)
            raise _translate(exc) from exc
        except _DRIVER_ERRORS as exc:
            raise _translate(exc) from exc
        finally:
            self._pool.release(conn, reusable=reusable)

    async def _as_user(
        self, conn: asyncpg.Connection, statement: str, values: Values, until: float
    ) -> Any:
        """`statement` in a transaction as role `authenticated` with the caller's claims, each
        step by `until`. An SQL error rolls it back; a timeout or a lost connection leaves the
        connection to be closed, which ends the transaction (asyncpg's `transaction()` would
        first wait for the rollback of a server that does not answer)."""
        await conn.execute("begin", timeout=until - time.monotonic())
        try:
            await conn.execute(_SET_USER_CONTEXT, self._claims, timeout=until - time.monotonic())
            result = await conn.fetchval(statement, *values, timeout=until - time.monotonic())
        except asyncpg.PostgresError as exc:
            if reusable_after(exc):
                await conn.execute("rollback", timeout=until - time.monotonic())
            raise
        await conn.execute("commit", timeout=until - time.monotonic())
        return result


class _ServiceSession(_Session):
    """The service layer: calls of functions with a batched form join while the pool is busy,
    and a user's calls go one batch (or lone call) at a time (server/transports/batching.py)."""

    def __init__(self, pool: ConnectionPool, timeout: float) -> None:
        super().__init__(pool, timeout, None)
        self._batchers: dict[Declared, Batcher] = {}

    async def call(self, call: SqlCall[Any]) -> Any:
        declared = type(call)
        timeout = runtime.step_timeout(self._timeout)
        if declared.batched is None:
            return await self._run(_statement(declared), call.values(), timeout, declared.ahead)
        batcher = self._batchers.get(declared)
        if batcher is None:
            batcher = self._batcher(declared)
        values = call.values()
        user = values[0]  # p_user_id: every batched form's first parameter
        if not batcher.may_go_alone(user):
            return await batcher.call(user, values, timeout)
        batcher.going_alone(user)
        try:
            return await self._run(_statement(declared), values, timeout)
        finally:
            batcher.done_alone(user)

    def _batcher(self, declared: Declared) -> Batcher:
        if declared.params()[0] != "p_user_id":
            raise TypeError(f"{declared.batched} must take p_user_id first: calls join per user")
        send = functools.partial(_send_batch, declared)
        max_out = MAX_OUT_READS if declared.reads else MAX_OUT
        batcher = Batcher(
            declared.function, self._pool, send, _batch_failed, self._timeout, max_out
        )
        self._batchers[declared] = batcher
        return batcher


async def _send_batch(
    declared: Declared, conn: asyncpg.Connection, calls: Sequence[Values], within: float
) -> list[object]:
    """Each call's result, or the domain error it raised, in the order of `calls`."""
    if len(calls) == 1:
        try:
            return [await conn.fetchval(_statement(declared), *calls[0], timeout=within)]
        except asyncpg.PostgresError as exc:
            return [_translate(exc)]
    columns = [list(column) for column in zip(*calls, strict=True)]
    outcomes: list[object] = [None] * len(calls)
    for ordinal, result, code, message, detail in await conn.fetch(
        _each_statement(declared), *columns, timeout=within
    ):
        if code is None:
            outcomes[ordinal - 1] = result
        else:
            fields = {"C": code, "M": message, "D": detail}
            outcomes[ordinal - 1] = _translate(asyncpg.PostgresError.new(fields))
    return outcomes


def _batch_failed(exc: BaseException) -> BaseException:
    """What each call of a batch raises when the batch as a whole failed with `exc`, or when
    its own time ran out (a TimeoutError)."""
    if isinstance(exc, _DRIVER_ERRORS):
        return _translate(exc)
    return BackendUnavailable()  # the pool closed or timed out, or the call was cancelled


def _translate(exc: BaseException) -> BaseException:
    """The domain error (or CredentialsRejected) for a driver error; other errors unchanged."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        known = domain_error(sqlstate, str(exc), getattr(exc, "detail", None))
        if known is not None:
            return known
        if sqlstate.startswith(_CREDENTIALS_CLASS):
            return CredentialsRejected(f"SQLSTATE {sqlstate}")
        if is_transient(sqlstate):
            return BackendUnavailable()
        return exc
    if isinstance(exc, _DRIVER_ERRORS):  # the PostgreSQL ones are answered above
        return BackendUnavailable()
    return exc
