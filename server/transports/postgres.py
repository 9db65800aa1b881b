"""The direct PostgreSQL transport (asyncpg).

Pooled connections run as `service_role` (the service layer). The user layer runs each call in
a transaction as role `authenticated` with `request.jwt.claims` set, exactly as PostgREST does,
so row-level security sees what it would see for a Supabase client. While the pool is busy, the
service layer's calls of a function with a batched form go to the database together
(server/transports/batching.py).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from server.auth.principal import UserPrincipal
from server.errors import BackendUnavailable
from server.observability import metrics
from server.repository.functions import SqlCall
from server.repository.transport import CredentialsRejected
from server.transports.batching import Batcher, Values
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


# Both rendered from the declarations in server/repository/functions.py only, once each.
_statements: dict[Declared, str] = {}
_each_statements: dict[Declared, str] = {}


def _statement(declared: Declared) -> str:
    statement = _statements.get(declared)
    if statement is None:
        statement = f"select public.{declared.function}({_arguments(declared)})"
        _statements[declared] = statement
    return statement


def _each_statement(declared: Declared) -> str:
    statement = _each_statements.get(declared)
    if statement is None:
        columns = "ordinal, result, error_code, error_message, error_detail"
        statement = f"select {columns} from public.{declared.batched}({_arguments(declared)})"  # noqa: S608
        _each_statements[declared] = statement
    return statement


def _arguments(declared: Declared) -> str:
    return ", ".join(f"{param} => ${i}" for i, param in enumerate(declared.params(), start=1))


class PostgresTransport:
    """A connection pool and the two layers over it."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._service = _ServiceSession(pool)

    @classmethod
    async def connect(
        cls, url: str, *, min_size: int = 2, max_size: int = 10, command_timeout: float = 10.0
    ) -> PostgresTransport:
        async def connect() -> asyncpg.Connection:
            try:
                conn = await asyncpg.connect(
                    url,
                    timeout=command_timeout,
                    command_timeout=command_timeout,
                    server_settings={"role": "service_role", "application_name": "credits"},
                )
            except _DRIVER_ERRORS as exc:
                raise _translate(exc) from exc
            try:
                for type_name in ("json", "jsonb"):
                    await conn.set_type_codec(
                        type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
                    )
            except BaseException as exc:
                conn.terminate()  # half set up: never handed out
                if isinstance(exc, _DRIVER_ERRORS):
                    raise _translate(exc) from exc
                raise
            return conn

        pool = await ConnectionPool.open(
            connect, min_size=min_size, max_size=max_size, acquire_timeout=command_timeout
        )
        metrics.watch_pool(pool.size, pool.idle)
        return cls(pool)

    def service(self) -> _ServiceSession:
        return self._service

    def as_user(self, principal: UserPrincipal) -> _Session:
        return _Session(self._pool, json.dumps(dict(principal.claims)))

    async def close(self) -> None:
        await self._pool.close()


class _Session:
    def __init__(self, pool: ConnectionPool, claims: str | None) -> None:
        self._pool = pool
        self._claims = claims

    async def call(self, call: SqlCall[Any]) -> Any:
        statement, values = _statement(type(call)), call.values()
        try:
            conn = await self._pool.acquire()
        except (PoolClosed, TimeoutError):
            raise BackendUnavailable() from None
        # Back to the pool only after the server answered: a result, or an SQL error.
        reusable = False
        try:
            if self._claims is None:
                result = await conn.fetchval(statement, *values)
            else:
                async with conn.transaction():
                    await conn.execute(_SET_USER_CONTEXT, self._claims)
                    result = await conn.fetchval(statement, *values)
            reusable = True
            return result
        except asyncpg.PostgresError as exc:
            reusable = reusable_after(exc)
            raise _translate(exc) from exc
        except _DRIVER_ERRORS as exc:
            raise _translate(exc) from exc
        finally:
            self._pool.release(conn, reusable=reusable)


class _ServiceSession(_Session):
    """The service layer: calls of functions with a batched form join while the pool is busy."""

    def __init__(self, pool: ConnectionPool) -> None:
        super().__init__(pool, None)
        self._batchers: dict[Declared, Batcher] = {}

    async def call(self, call: SqlCall[Any]) -> Any:
        declared = type(call)
        if declared.batched is None or not self._pool.busy():
            return await super().call(call)
        batcher = self._batchers.get(declared)
        if batcher is None:
            send = functools.partial(_send_batch, declared)
            batcher = Batcher(declared.function, self._pool, send, _batch_failed)
            self._batchers[declared] = batcher
        return await batcher.call(call.values())


async def _send_batch(
    declared: Declared, conn: asyncpg.Connection, calls: Sequence[Values]
) -> list[object]:
    """Each call's result, or the domain error it raised, in the order of `calls`."""
    if len(calls) == 1:
        try:
            return [await conn.fetchval(_statement(declared), *calls[0])]
        except asyncpg.PostgresError as exc:
            return [_translate(exc)]
    columns = [list(column) for column in zip(*calls, strict=True)]
    outcomes: list[object] = [None] * len(calls)
    for ordinal, result, code, message, detail in await conn.fetch(
        _each_statement(declared), *columns
    ):
        if code is None:
            outcomes[ordinal - 1] = result
        else:
            fields = {"C": code, "M": message, "D": detail}
            outcomes[ordinal - 1] = _translate(asyncpg.PostgresError.new(fields))
    return outcomes


def _batch_failed(exc: BaseException) -> BaseException:
    """What each call of a batch raises when the batch as a whole failed with `exc`."""
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
