"""The direct PostgreSQL transport (asyncpg).

Pooled connections run as `service_role` (the service layer). The user layer runs each call in
a transaction as role `authenticated` with `request.jwt.claims` set, exactly as PostgREST does,
so row-level security sees what it would see for a Supabase client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from server.auth.principal import UserPrincipal
from server.errors import BackendUnavailable
from server.observability import metrics
from server.repository.functions import SqlFunction
from server.repository.sql_errors import domain_error
from server.repository.transport import CredentialsRejected

# SQLSTATE classes: 08 connection exception, 53 insufficient resources, 57 operator
# intervention (shutdown, cannot connect now), 28 invalid authorization.
_UNAVAILABLE_CLASSES = ("08", "53", "57")
_CREDENTIALS_CLASS = "28"
_LOST_CONNECTION = asyncpg.ConnectionDoesNotExistError

_SET_USER_CONTEXT = (
    "select pg_catalog.set_config('role', 'authenticated', true), "
    "pg_catalog.set_config('request.jwt.claims', $1, true)"
)


def _statement(function: SqlFunction) -> str:
    # Rendered from the constant registry in server/repository/functions.py only.
    args = ", ".join(f"{param} => ${i}" for i, param in enumerate(function.params, start=1))
    return f"select public.{function.name}({args})"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: calls never change session state
    (the user context is transaction-local), and asyncpg still rolls back an open transaction.
    The default reset would cost a round trip per call."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


class PostgresTransport:
    """A connection pool and the two layers over it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._service = _Session(self, None)

    @classmethod
    async def connect(
        cls, url: str, *, min_size: int = 2, max_size: int = 10, command_timeout: float = 10.0
    ) -> PostgresTransport:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min(min_size, max_size),
                max_size=max_size,
                command_timeout=command_timeout,
                server_settings={"role": "service_role", "application_name": "credits"},
                init=_init_connection,
                reset=_keep_session,
            )
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise _translate(exc) from exc
        metrics.watch_pool(pool.get_size, pool.get_idle_size)
        return cls(pool)

    def service(self) -> _Session:
        return self._service

    def as_user(self, principal: UserPrincipal) -> _Session:
        return _Session(self, json.dumps(dict(principal.claims)))

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PoolConnectionProxy]:
        """A pooled connection (role service_role), with connection failures translated."""
        try:
            async with self._pool.acquire(timeout=10.0) as conn:
                yield conn
        except (OSError, asyncpg.PostgresError, _LOST_CONNECTION, TimeoutError) as exc:
            raise _translate(exc) from exc


class _Session:
    def __init__(self, transport: PostgresTransport, claims: str | None) -> None:
        self._transport = transport
        self._claims = claims

    async def call(self, function: SqlFunction, args: Mapping[str, object]) -> Any:
        values = [args.get(param) for param in function.params]
        async with self._transport.connection() as conn:
            if self._claims is None:
                return await conn.fetchval(_statement(function), *values)
            async with conn.transaction():
                await conn.execute(_SET_USER_CONTEXT, self._claims)
                return await conn.fetchval(_statement(function), *values)


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
