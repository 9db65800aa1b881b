"""`credits check-config`: checks the configuration a deployment will use, one line per check.

Every check says OK or FAIL with a hint, so a misconfigured service key or a missing migration
is found before the first user is refused, not by the first refusal.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Awaitable, Callable

import httpx
import jwt
from postgrest import AsyncPostgrestClient
from postgrest.exceptions import APIError

from server import app, errors, serving
from server.auth.principal import ServicePrincipal
from server.config import Settings
from server.db import migrate
from server.observability import tracing
from server.repository import functions
from server.repository.transport import CredentialsRejected, Transport
from server.transports.sql_errors import INSUFFICIENT_PRIVILEGE


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""

    def line(self) -> str:
        status = "OK  " if self.ok else "FAIL"
        hint = f"\n       hint: {self.hint}" if self.hint and not self.ok else ""
        return f"{status} {self.name}: {self.detail}{hint}"


async def run(settings: Settings, token: str | None = None) -> list[Check]:
    """All checks that apply to `settings` (resolved: embedded secret filled in)."""
    results: list[Check] = []
    project = settings.supabase_project
    if project is not None:
        results += await _supabase_checks(settings, project.url, project.anon_key)
    elif settings.database_url:
        results += await _postgres_checks(settings, settings.database_url)
    else:
        results.append(
            Check(
                "database",
                True,
                f"embedded PostgreSQL in {settings.data_dir}, started and migrated by "
                "`credits serve`",
            )
        )
    results.append(await _jwks_check(settings))
    if token is not None:
        results.append(await _token_check(settings, token))
    results.append(_tracing_check())
    # Bad values never get here (Settings.from_env refuses them); this says what will be used.
    results.append(Check("serving", True, serving.describe(settings)))
    return results


async def _postgres_checks(settings: Settings, url: str) -> list[Check]:
    try:
        transport = await app.connect(settings, url, pool_size=1)
    except (errors.CreditsError, CredentialsRejected) as error:
        return [
            Check(
                "database reachable",
                False,
                f"cannot connect ({error})",
                "check DATABASE_URL; the role needs membership in service_role and authenticated",
            )
        ]
    try:
        results = [Check("database reachable", True, "connected as service_role")]
        waiting = await migrate.pending(url)
        results.append(
            Check(
                "migrations applied",
                not waiting,
                "all applied" if not waiting else f"pending: {', '.join(waiting)}",
                "start `credits serve` once: it applies them",
            )
        )
        results.append(await _service_probe(transport, "service role accepted"))
        return results
    finally:
        await transport.close()


async def _supabase_checks(settings: Settings, url: str, anon_key: str) -> list[Check]:
    transport = await app.connect(settings, None, pool_size=1)
    try:
        return [
            await _service_probe(transport, "service key accepted", url),
            await _migration_probe(transport, url),
            await _anon_probe(url, anon_key),
        ]
    finally:
        await transport.close()


async def _service_probe(transport: Transport, name: str, url: str | None = None) -> Check:
    """The service layer can call a read-only ledger function (for an unknown user)."""

    async def probe() -> object:
        return await transport.service().call(functions.GetProfile(uuid.uuid4()))

    outcome = await _attempt(probe)
    if isinstance(outcome, errors.ProfileNotFound):
        return Check(name, True, "the ledger functions answer the service role")
    unreachable = _unreachable(outcome, url)
    if unreachable is not None:
        return Check(name, False, unreachable, UNREACHABLE_HINT)
    if isinstance(outcome, CredentialsRejected):
        return Check(
            name,
            False,
            f"rejected ({outcome})",
            "set SUPABASE_SERVICE_ROLE_KEY to the project's service_role or secret key; until "
            "then the service falls back to users' own tokens and refuses service-only calls",
        )
    return Check(name, False, _describe(outcome), "is the database reachable and migrated?")


MIGRATIONS_HINT = (
    "apply them with the Supabase CLI: `supabase db push` from this repository, or, when your "
    "app's project has migrations of its own, copy server/db/migrations/*.sql into its "
    "supabase/migrations/ and push from there (docs/supabase.md)"
)
UNREACHABLE_HINT = "check SUPABASE_URL, and that this host can reach it (DNS, firewall, proxy)"


async def _migration_probe(transport: Transport, url: str) -> Check:
    """The project has applied every migration this service ships, by the versions it records
    (credit_schema_versions); a project older than that function is compared by its newest
    version only (credit_schema_version)."""
    name = "migrations applied"
    shipped = migrate.discover()
    outcome = await _attempt(lambda: transport.service().call(functions.SchemaVersions()))
    if isinstance(outcome, list):
        recorded = set(functions.SchemaVersions().decode(outcome))
        missing = [m for m in shipped if m.version not in recorded]
        return Check(name, not missing, _missing(missing) or "all applied", MIGRATIONS_HINT)
    if _no_function(outcome):  # a project older than credit_schema_versions()
        outcome = await _attempt(lambda: transport.service().call(functions.SchemaVersion()))
        if isinstance(outcome, str):
            newest = functions.SchemaVersion().decode(outcome)
            newer = [m for m in shipped if m.version > newest]
            detail = f"{_missing(newer)} (the newest applied is {newest})" if newer else ""
            return Check(name, not newer, detail or "all applied", MIGRATIONS_HINT)
        if _no_function(outcome):  # older still: before credit_schema_version()
            detail = f"{_missing(shipped[-1:])} ({_describe(outcome)})"
            return Check(name, False, detail, MIGRATIONS_HINT)
    unreachable = _unreachable(outcome, url)
    if unreachable is not None:
        return Check(name, False, unreachable, UNREACHABLE_HINT)
    return Check(name, False, f"not checked ({_describe(outcome)})", "see the line above")


def _missing(migrations: list[migrate.Migration]) -> str:
    """`missing: <version>_<name>, ...` ("" for none)."""
    named = ", ".join(f"{m.version}_{m.name}" for m in migrations)
    return f"missing: {named}" if named else ""


def _no_function(outcome: object) -> bool:
    """The project lacks the function called (PostgREST's PGRST202)."""
    return isinstance(outcome, APIError) and outcome.code == "PGRST202"


def _unreachable(outcome: object, url: str | None) -> str | None:
    """What a failed check says when `outcome` is the network failing, not the project."""
    cause = outcome.__cause__ if isinstance(outcome, errors.BackendUnavailable) else None
    if url is None or not isinstance(cause, httpx.TransportError):
        return None
    return f"cannot reach {url} ({type(cause).__name__})"


async def _anon_probe(url: str, anon_key: str) -> Check:
    """The gateway accepts the anon key (PostgREST then refuses the anon role, as it should)."""
    client = AsyncPostgrestClient(
        url.rstrip("/") + "/rest/v1",
        headers={"apiKey": anon_key, "Authorization": f"Bearer {anon_key}"},
    )
    try:
        probe = functions.GetProfile(uuid.uuid4())
        await client.rpc(probe.function, {"p_user_id": str(probe.user_id)}).execute()
        return Check(
            "anon key accepted",
            False,
            "the anon role could call a ledger function",
            "revoke execute on public.credit_* from anon (see the migrations)",
        )
    except APIError as error:
        if error.code == INSUFFICIENT_PRIVILEGE:
            return Check(
                "anon key accepted", True, "accepted; the anon role is refused, as it should be"
            )
        return Check(
            "anon key accepted",
            False,
            f"refused ({error.code or error.message})",
            "set SUPABASE_ANON_KEY to the project's anon or publishable key",
        )
    except httpx.TransportError as error:
        return Check(
            "anon key accepted",
            False,
            f"unreachable ({type(error).__name__})",
            "check SUPABASE_URL",
        )
    finally:
        await client.aclose()


def _tracing_check() -> Check:
    """Whether traces are exported and where; a protocol `credits serve` would refuse fails."""
    try:
        return Check("tracing", True, tracing.describe(os.environ))
    except ValueError as error:
        return Check(
            "tracing",
            False,
            str(error),
            "set OTEL_EXPORTER_OTLP_PROTOCOL to http/protobuf or grpc, or leave it unset",
        )


async def _jwks_check(settings: Settings) -> Check:
    if not settings.jwks_url:
        return Check(
            "token keys",
            bool(settings.jwt_secret),
            "HS256 with the JWT secret" if settings.jwt_secret else "none configured",
            "set SUPABASE_JWT_SECRET or CREDITS_JWKS_URL",
        )
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.get(settings.jwks_url)
        response.raise_for_status()
        keys = jwt.PyJWKSet.from_dict(response.json()).keys
    except (httpx.HTTPError, ValueError, jwt.PyJWTError) as error:
        return Check(
            "JWKS reachable",
            False,
            f"{settings.jwks_url}: {type(error).__name__}",
            "set CREDITS_JWKS_URL, or SUPABASE_URL for the project's default",
        )
    algorithms = sorted({str(key.algorithm_name) for key in keys})
    return Check("JWKS reachable", True, f"{len(keys)} key(s): {', '.join(algorithms)}")


async def _token_check(settings: Settings, token: str) -> Check:
    try:
        principal = await app.token_verifier(settings).verify(token)
    except errors.CreditsError as error:
        return Check(
            "token verifies",
            False,
            error.reason,
            "is SUPABASE_JWT_SECRET (or the JWKS) the project's, and the audience right?",
        )
    who = "the service" if isinstance(principal, ServicePrincipal) else f"user {principal.user_id}"
    return Check("token verifies", True, f"as {who}")


async def _attempt(call: Callable[[], Awaitable[object]]) -> object:
    """The call's result, or the error it raised (checks report errors, they do not raise)."""
    try:
        return await call()
    except (errors.CreditsError, CredentialsRejected, APIError) as error:
        return error


def _describe(outcome: object) -> str:
    if isinstance(outcome, errors.CreditsError):
        return f"{outcome.reason}: {outcome.message}"
    if isinstance(outcome, APIError):
        return f"{outcome.code}: {outcome.message}"
    return repr(outcome)
