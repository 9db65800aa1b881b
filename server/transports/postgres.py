"""The direct PostgreSQL transport (asyncpg).

Pooled connections run as `service_role` (the service layer). The user layer runs each call in
a transaction as role `authenticated` with `request.jwt.claims` set, exactly as PostgREST does,
so row-level security sees what it would see for a Supabase client.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import asyncpg

from server.auth.principal import UserPrincipal
from server.errors import BackendUnavailable
from server.observability import metrics
from server.repository.functions import SqlFunction
from server.repository.sql_errors import domain_error
from server.repository.transport import CredentialsRejected
from server.transports.pool import ConnectionPool, PoolClosed

# SQLSTATE classes: 08 connection exception, 53 insufficient resources, 57 operator
# intervention (shutdown, cannot connect now), 28 invalid authorization.
_UNAVAILABLE_CLASSES = ("08", "53", "57")
_CREDENTIALS_CLASS = "28"
_LOST_CONNECTION = asyncpg.ConnectionDoesNotExistError
_DRIVER_ERRORS = (OSError, asyncpg.PostgresError, _LOST_CONNECTION, TimeoutError)

_SET_USER_CONTEXT = (
    "select pg_catalog.set_config('role', 'authenticated', true), "
    "pg_catalog.set_config('request.jwt.claims', $1, true)"
)


@functools.cache
def _statement(function: SqlFunction) -> str:
    # Rendered from the constant registry in server/repository/functions.py only.
    args = ", ".join(f"{param} => ${i}" for i, param in enumerate(function.params, start=1))
    return f"select public.{function.name}({args})"


class PostgresTransport:
    """A connection pool and the two layers over it."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._service = _Session(pool, None)

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

    def service(self) -> _Session:
        return self._service

    def as_user(self, principal: UserPrincipal) -> _Session:
        return _Session(self._pool, json.dumps(dict(principal.claims)))

    async def close(self) -> None:
        await self._pool.close()


class _Session:
    def __init__(self, pool: ConnectionPool, claims: str | None) -> None:
        self._pool = pool
        self._claims = claims

    async def call(self, function: SqlFunction, args: Mapping[str, object]) -> Any:
        values = [args.get(param) for param in function.params]
        try:
            conn = await self._pool.acquire()
        except (PoolClosed, TimeoutError):
            raise BackendUnavailable() from None
        # Back to the pool only after the server answered: a result, or an SQL error.
        reusable = False
        try:
            if self._claims is None:
                result = await conn.fetchval(_statement(function), *values)
            else:
                async with conn.transaction():
                    await conn.execute(_SET_USER_CONTEXT, self._claims)
                    result = await conn.fetchval(_statement(function), *values)
            reusable = True
            return result
        except asyncpg.PostgresError as exc:
            reusable = True
            raise _translate(exc) from exc
        except _DRIVER_ERRORS as exc:
            raise _translate(exc) from exc
        finally:
            self._pool.release(conn, reusable=reusable)


def _translate(exc: BaseException) -> BaseException:
    """The domain error (or CredentialsRejected) for a driver error; other errors unchanged."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        known = domain_error(sqlstate, str(exc), getattr(exc, "detail", None))
        if known is not None:
            return known
        if sqlstate.startswith(_CREDENTIALS_CLASS):
            return CredentialsRejected(f"SQLSTATE {sqlstate}")
        if sqlstate[:2] in _UNAVAILABLE_CLASSES:
            return BackendUnavailable()
        return exc
    if isinstance(exc, OSError | TimeoutError | _LOST_CONNECTION):
        return BackendUnavailable()
    return exc
