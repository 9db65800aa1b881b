"""The Supabase transport: a project's REST API (PostgREST), through the supabase package.

The service layer is one shared supabase client built with the service key (a legacy JWT or a
newer `sb_secret_...` key). The user layer is a fresh PostgREST client per call with the anon
key and the caller's own JWT, so row-level security applies: the supabase client keeps its
headers in shared mutable state, and one client shared by users would send one user's token on
another user's request. Only the HTTP connection pool is shared, and it carries no headers.

Both layers call the same SQL functions as the postgres transport, by name with named
arguments, and their errors map to the same domain errors. A call that gets no answer within
the configured timeout (CREDITS_DB_TIMEOUT_SECONDS), or sooner when the RPC it serves must be
answered sooner (runtime.step_timeout), is BACKEND_UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import datetime
from typing import Any

import httpx
from postgrest import AsyncPostgrestClient
from postgrest.exceptions import APIError
from supabase import AsyncClient, AsyncClientOptions

from server import errors, runtime
from server.auth.principal import UserPrincipal
from server.config import SupabaseProject
from server.observability import tracing
from server.repository.functions import SchemaVersion, SqlCall
from server.repository.transport import CredentialsRejected
from server.transports.sql_errors import domain_error, is_transient

log = logging.getLogger(__name__)

# PostgREST's JWT errors: could not be decoded or bad signature, anonymous access disabled,
# claims invalid (expired). The API gateway's own refusal of a key carries no code.
_JWT_ERRORS = {"PGRST301", "PGRST302", "PGRST303"}
_INVALID_API_KEY = "Invalid API key"
# PostgREST cannot reach or use its database.
_UNAVAILABLE_CODES = {"PGRST000", "PGRST001", "PGRST002", "PGRST003"}
# The default of CREDITS_DB_TIMEOUT_SECONDS (as the postgres transport's).
DEFAULT_TIMEOUT = 3.0
# A traced call's span (named after the function): a SQL call, as the asyncpg transport's are.
_SPAN_ATTRIBUTES = {"db.system": "postgresql", "credits.transport": "supabase"}


class SupabaseTransport:
    """The service client, the user-client factory and the connection pool they share."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        service: AsyncClient,
        rest_url: str,
        anon_key: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._http = http
        self._service = _Session(service.postgrest, timeout, service=True)
        self._rest_url = rest_url
        self._anon_key = anon_key
        self._timeout = timeout

    @classmethod
    def connect(
        cls, project: SupabaseProject, *, timeout: float = DEFAULT_TIMEOUT
    ) -> SupabaseTransport:
        http = httpx.AsyncClient(timeout=timeout)
        options = AsyncClientOptions(
            httpx_client=http, auto_refresh_token=False, persist_session=False
        )
        service = AsyncClient(project.url, project.service_key, options)
        rest_url = project.url.rstrip("/") + "/rest/v1"
        return cls(http, service, rest_url, project.anon_key, timeout)

    def service(self) -> _Session:
        return self._service

    def as_user(self, principal: UserPrincipal) -> _Session:
        client = AsyncPostgrestClient(
            self._rest_url,
            headers={"apiKey": self._anon_key, "Authorization": f"Bearer {principal.token}"},
            http_client=self._http,
        )
        return _Session(client, self._timeout, service=False)

    async def probe(self, within: float) -> None:
        """A cheap call through the REST API to the database (the schema version) answered
        within `within` seconds, or BackendUnavailable. A refusal (of the credentials, say)
        still proves the database reachable: it is the breaker's business, not health's."""
        try:
            await self._service.call(SchemaVersion(), within=within)
        except errors.BackendUnavailable:
            raise
        except (CredentialsRejected, errors.CreditsError, APIError):
            return  # an answer from the database, if not the one hoped for

    async def close(self) -> None:
        await self._http.aclose()


class _Session:
    def __init__(self, client: AsyncPostgrestClient, timeout: float, *, service: bool) -> None:
        self._client = client
        self._timeout = timeout
        self._is_service = service

    async def call(self, call: SqlCall[Any], *, within: float | None = None) -> Any:
        """The function's JSON result within `within` seconds (default: the configured
        timeout, or less near the RPC's deadline)."""
        params = {
            name: _json_value(value)
            for name, value in zip(call.params(), call.values(), strict=True)
        }
        if within is None:
            within = runtime.step_timeout(self._timeout)
        try:
            async with asyncio.timeout(within):
                with tracing.span(call.function, _SPAN_ATTRIBUTES, client=True):
                    response = await self._client.rpc(call.function, params).execute()
        except APIError as error:
            raise translate_error(error, service=self._is_service) from error
        except (httpx.TransportError, TimeoutError) as error:  # refused, reset, no answer
            raise errors.BackendUnavailable() from error
        return response.data


def _json_value(value: object) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def translate_error(error: APIError, *, service: bool) -> BaseException:
    """The domain error (or CredentialsRejected) for a PostgREST or gateway error."""
    code = error.code or ""
    details = error.details if isinstance(error.details, str | None) else json.dumps(error.details)
    known = domain_error(code, error.message or "", details)
    if isinstance(known, errors.AccessDeniedByPolicy) and service:
        # Our functions never refuse service_role: the key is not really a service key.
        return CredentialsRejected("the service key was refused a function (SQLSTATE 42501)")
    if known is not None:
        return known
    if code in _JWT_ERRORS or error.message == _INVALID_API_KEY:
        reason = code or _INVALID_API_KEY
        if service:
            return CredentialsRejected(reason)
        if code == "PGRST303":
            return errors.TokenExpired()
        if code:
            return errors.TokenInvalid("the Supabase project refused the access token")
        log.error("the Supabase project refused SUPABASE_ANON_KEY (%s)", reason)
        return errors.CreditsError()
    if code in _UNAVAILABLE_CODES or is_transient(code) or _is_5xx(code):
        return errors.BackendUnavailable()
    return error


def _is_5xx(code: str) -> bool:
    # postgrest-py reports a non-PostgREST error body (a proxy's error page) by its HTTP status.
    return code.isdigit() and len(code) == 3 and code.startswith("5")
