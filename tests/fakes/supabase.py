"""A FAKE Supabase project for tests: API gateway + PostgREST + the auth JWKS endpoint.

`FakeSupabase` is an aiohttp server on 127.0.0.1 that runs in the current asyncio loop in front of
a real PostgreSQL database (one bootstrapped with server/db/bootstrap.sql and migrated). It keeps
the documented behaviour of the pieces a Supabase client talks to, so that code written against
supabase-py / postgrest-py can be tested without Supabase. It is NOT Supabase.

Implemented:

- The API gateway (Kong) in front of /rest/v1: an `apikey` header (any case) or `?apikey=` param
  is required and must be one of the project's keys (legacy anon / service_role JWTs, or new
  `sb_publishable_` / `sb_secret_` keys); it is stripped before PostgREST. Without an
  Authorization header (or with `Bearer <the same sb_ key>`) the gateway forwards a JWT of the
  key's role; a user's JWT in Authorization is forwarded as it is.
- PostgREST's authentication: `Authorization: Bearer <jwt>` verified with the HS256 secret or the
  fake's ES256 key (by `kid`), `exp`/`nbf`/`iat` checked with PostgREST's 30 s clock skew, PGRST301
  / PGRST303 errors; no token means the `anon` role. Per request one transaction that sets `role`
  and `request.jwt.claims` (plus `request.method`, `request.path`, `request.headers`) with
  `set_config(.., true)`, committed on success and rolled back on error.
- `POST /rest/v1/rpc/<fn>` (and `GET` with the arguments as query parameters): the function in
  schema public is chosen by the names of the body's keys (arguments with defaults may be left
  out), called with named arguments cast from JSON like PostgREST does (`json_to_record`), in a
  read-only transaction for stable/immutable functions and GET. 200 with the result as JSON; 204
  for void functions; PGRST202 (404) / PGRST203 (300) when no or several functions match.
- `GET /rest/v1/<table>`: `select` (plain column names or `*`), `eq.` filters, `order`, `limit`,
  `offset`, `Prefer: count=exact`, `Accept: application/vnd.pgrst.object+json`; under the
  request's role, so privileges and row-level security apply. Unknown table: PGRST205 (404).
- PostgreSQL errors as PostgREST reports them ({code, details, hint, message}, its status table);
  an unreachable database is PGRST000 (503).
- `GET /auth/v1/.well-known/jwks.json` with one EC P-256 public key; `mint_user_token` makes
  Supabase-shaped user access tokens signed with it (or with the HS256 secret).
- Test switches: service key rejected by PostgREST ("jwt") or by the gateway ("gateway"),
  `go_down` / `come_back` on the same port, and counters of the requests that reached PostgREST.

Not implemented (a request needing it gets 501 with code "FAKE501", never a silent guess):
table writes (POST/PATCH/DELETE), HEAD, operators other than `eq` (`neq`, `in`, `is`, `or`, ...),
resource embedding, aliases and casts in `select`, bulk RPC calls (a JSON array body), functions
with a single unnamed json parameter, variadic arguments, the OpenAPI root, other schemas than
public (PGRST106), `Prefer: return=`/`tx=`, CSV. The auth API (sign-up, sign-in, refresh),
storage, realtime and edge functions are not faked.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import asyncpg
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

ServiceKeyRejection = Literal["jwt", "gateway"]
UserTokenAlg = Literal["ES256", "HS256"]

ANON_ROLE: Final = "anon"
SERVICE_ROLE: Final = "service_role"
SCHEMA: Final = "public"
# PostgREST accepts exp/nbf/iat this many seconds off (src/PostgREST/Auth.hs: allowedSkewSeconds).
JWT_CLOCK_SKEW_SECONDS: Final = 30
_FAR_FUTURE_SECONDS: Final = 10 * 365 * 24 * 3600
_JSON: Final = "application/json"
_OBJECT_JSON: Final = "application/vnd.pgrst.object+json"
_HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
_READ_PARAMS: Final = frozenset({"select", "order", "limit", "offset"})
_ORDER_WORDS: Final = {
    "asc": "asc",
    "desc": "desc",
    "nullsfirst": "nulls first",
    "nullslast": "nulls last",
}
_GATEWAY_HINT: Final = "Double check your Supabase `anon` or `service_role` API key."
_NO_DATABASE: Final = (
    "Could not connect with the database due to an incorrect db-uri or due to the PostgreSQL "
    "service not running."
)

Json = dict[str, Any]

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]
    _Prepare: TypeAlias = Callable[[_Connection], Awaitable["_Statement"]]


# Errors


class _HttpError(Exception):
    """An error answer, raised anywhere in a request and turned into the response at the top."""

    def __init__(self, status: int, body: Json, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(body.get("message"))
        self.status = status
        self.body = body
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


def _pgrst(
    status: int,
    code: str,
    message: str,
    *,
    details: str | None = None,
    hint: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> _HttpError:
    """A PostgREST error body, keys in PostgREST's order."""
    body = {"code": code, "details": details, "hint": hint, "message": message}
    return _HttpError(status, body, headers)


def _gateway_error(message: str, hint: str) -> _HttpError:
    return _HttpError(401, {"message": message, "hint": hint})


def _invalid_api_key() -> _HttpError:
    return _gateway_error("Invalid API key", _GATEWAY_HINT)


def _jwt_invalid(message: str) -> _HttpError:
    challenge = f'Bearer error="invalid_token", error_description="{message}"'
    return _pgrst(401, "PGRST301", message, headers={"WWW-Authenticate": challenge})


def _jwt_claims_invalid(message: str) -> _HttpError:
    challenge = f'Bearer error="invalid_token", error_description="{message}"'
    return _pgrst(401, "PGRST303", message, headers={"WWW-Authenticate": challenge})


def _unsupported(what: str) -> _HttpError:
    return _HttpError(
        501,
        {
            "code": "FAKE501",
            "details": None,
            "hint": "Extend tests/fakes/supabase.py if a test needs it.",
            "message": f"FakeSupabase does not implement {what}",
        },
    )


def _connection_error(exc: BaseException) -> _HttpError:
    return _pgrst(503, "PGRST000", _NO_DATABASE, details=str(exc) or type(exc).__name__)


def _sqlstate_status(code: str, message: str, *, authed: bool) -> int:
    """PostgREST's HTTP status for a PostgreSQL error (src/PostgREST/Error.hs, pgErrorStatus)."""
    exact = {
        "23503": 409,
        "23505": 409,
        "25006": 405,
        "42883": 404,
        "42P01": 404,
        "42P17": 500,
        "53400": 500,
        "57P01": 503,
        "P0001": 400,
        "42501": 403 if authed else 401,
    }
    if code in exact:
        return exact[code]
    if code == "21000":
        return 400 if message.endswith("requires a WHERE clause") else 500
    if code == "22023" and message.startswith("role") and message.endswith("does not exist"):
        return 401
    if code.startswith("PT") and code[2:].isdigit():
        return int(code[2:])
    by_class = {
        "08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500,
        "39": 500, "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500, "57": 500, "58": 500,
        "F0": 500, "HV": 500, "P0": 500, "XX": 500,
    }  # fmt: skip
    return by_class.get(code[:2], 400)


def _database_error(exc: asyncpg.PostgresError, *, authed: bool) -> _HttpError:
    code = str(exc.sqlstate)
    message = str(exc.message)
    status = _sqlstate_status(code, message, authed=authed)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _pgrst(status, code, message, details=exc.detail, hint=exc.hint, headers=headers)


# Requests as PostgREST sees them


@dataclass(frozen=True)
class _Caller:
    """Who PostgREST runs the request as: the database role and the JWT's claims."""

    role: str
    claims: Json

    @property
    def authed(self) -> bool:
        return self.role != ANON_ROLE


@dataclass(frozen=True)
class _Statement:
    """One SQL statement to run as the caller; its first column is the response body (JSON)."""

    sql: str
    args: tuple[object, ...]
    read_only: bool
    void: bool = False


@dataclass(frozen=True)
class _Argument:
    name: str
    quoted: str
    type: str


@dataclass(frozen=True)
class _Function:
    """A function in the schema, as PostgREST's schema cache knows it."""

    qualified: str
    inputs: tuple[_Argument, ...]
    n_defaults: int
    returns_void: bool
    returns_set: bool
    read_only: bool

    def accepts(self, keys: Collection[str]) -> bool:
        names = [a.name for a in self.inputs]
        required = names[: len(names) - self.n_defaults]
        return set(keys) <= set(names) and set(required) <= set(keys)

    def signature(self) -> str:
        return ", ".join(f"{a.name} => {a.type}" for a in self.inputs)


_FUNCTIONS_SQL: Final = """
select pg_catalog.format('%I.%I', n.nspname, p.proname) as qualified,
       p.pronargdefaults as n_defaults,
       p.prorettype = 'pg_catalog.void'::pg_catalog.regtype as returns_void,
       p.proretset as returns_set,
       p.provolatile <> 'v' as read_only,
       coalesce((
         select pg_catalog.json_agg(pg_catalog.json_build_object(
                  'name', coalesce(a.name, ''), 'quoted', pg_catalog.quote_ident(a.name),
                  'type', pg_catalog.format_type(a.type, null)) order by a.ord)
           from rows from (
                  pg_catalog.unnest(coalesce(p.proallargtypes, p.proargtypes::pg_catalog.oid[])),
                  pg_catalog.unnest(p.proargnames),
                  pg_catalog.unnest(p.proargmodes::text[]))
                with ordinality as a(type, name, mode, ord)
          where coalesce(a.mode, 'i') in ('i', 'b')
       ), '[]')::text as inputs,
       exists (select 1 from pg_catalog.unnest(p.proargmodes::text[]) m where m = 'v')
         as variadic
  from pg_catalog.pg_proc p
  join pg_catalog.pg_namespace n on n.oid = p.pronamespace
 where n.nspname = $1 and p.proname = $2 and p.prokind = 'f'
"""

_TABLE_SQL: Final = """
select pg_catalog.format('%I.%I', n.nspname, c.relname) as qualified,
       coalesce((
         select pg_catalog.json_object_agg(a.attname, pg_catalog.json_build_object(
                  'quoted', pg_catalog.quote_ident(a.attname),
                  'type', pg_catalog.format_type(a.atttypid, a.atttypmod)))
           from pg_catalog.pg_attribute a
          where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
       ), '{}')::text as columns
  from pg_catalog.pg_class c
  join pg_catalog.pg_namespace n on n.oid = c.relnamespace
 where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'v', 'm', 'f', 'p')
"""

_IMPERSONATE_SQL: Final = """
select pg_catalog.set_config('request.jwt.claims', $1, true),
       pg_catalog.set_config('request.method', $2, true),
       pg_catalog.set_config('request.path', $3, true),
       pg_catalog.set_config('request.headers', $4, true),
       pg_catalog.set_config('role', $5, true)
"""


async def _functions(conn: _Connection, name: str) -> list[_Function]:
    rows = await conn.fetch(_FUNCTIONS_SQL, SCHEMA, name)
    return [_function(row) for row in rows if not row["variadic"]]


def _function(row: asyncpg.Record) -> _Function:
    inputs = tuple(_Argument(**a) for a in json.loads(row["inputs"]))
    return _Function(
        qualified=row["qualified"],
        inputs=inputs,
        n_defaults=row["n_defaults"],
        returns_void=row["returns_void"],
        returns_set=row["returns_set"],
        read_only=row["read_only"],
    )


def _function_not_found(name: str, keys: Collection[str]) -> _HttpError:
    qualified = f"{SCHEMA}.{name}"
    listed = ", ".join(sorted(keys))
    wanted = f"({listed})" if keys else " without parameters"
    searched = f" with parameters {listed}" if keys else " without parameters"
    return _pgrst(
        404,
        "PGRST202",
        f"Could not find the function {qualified}{wanted} in the schema cache",
        details=f"Searched for the function {qualified}{searched} or with a single unnamed "
        "json/jsonb parameter, but no matches were found in the schema cache.",
    )


def _ambiguous(candidates: list[_Function]) -> _HttpError:
    listed = ", ".join(f"{f.qualified}({f.signature()})" for f in candidates)
    return _pgrst(
        300,
        "PGRST203",
        f"Could not choose the best candidate function between: {listed}",
        hint="Try renaming the parameters or the function itself in the database so function "
        "overloading can be resolved",
    )


async def _resolve(conn: _Connection, name: str, keys: Collection[str]) -> _Function:
    candidates = [f for f in await _functions(conn, name) if f.accepts(keys)]
    if not candidates:
        raise _function_not_found(name, keys)
    if len(candidates) > 1:
        raise _ambiguous(candidates)
    return candidates[0]


def _call_statement(fn: _Function, arguments: Json, *, get: bool) -> _Statement:
    """The call with named arguments cast from JSON by json_to_record, as PostgREST does it."""
    chosen = [a for a in fn.inputs if a.name in arguments]
    named = ", ".join(f"{a.quoted} := pgrst_args.{a.quoted}" for a in chosen)
    call = f"{fn.qualified}({named})"
    source = ""
    args: tuple[object, ...] = ()
    if chosen:
        columns = ", ".join(f"{a.quoted} {a.type}" for a in chosen)
        source = f" from pg_catalog.json_to_record($1::json) as pgrst_args({columns})"
        args = (json.dumps(arguments),)
    if fn.returns_void:
        sql = f"select {call}{source}"
    elif fn.returns_set:
        sql = (
            "select coalesce(pg_catalog.json_agg(pgrst_call), '[]')::text"
            f" from (select {call} as pgrst_call{source}) pgrst_result"
        )
    else:
        sql = f"select pg_catalog.to_json({call})::text{source}"
    return _Statement(sql, args, read_only=get or fn.read_only, void=fn.returns_void)


# Table reads


@dataclass
class _Read:
    """A parsed `GET /rest/v1/<table>` query: validated column names and raw values."""

    columns: list[str] = field(default_factory=list)
    filters: list[tuple[str, str]] = field(default_factory=list)
    order: list[tuple[str, str]] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0


def _parse_read(query: Mapping[str, str], pairs: list[tuple[str, str]]) -> _Read:
    read = _Read()
    select = query.get("select", "*").strip() or "*"
    if select != "*":
        read.columns = [_plain_name(c.strip(), "select") for c in select.split(",")]
    for item in filter(None, query.get("order", "").split(",")):
        read.order.append(_order_term(item))
    read.limit = _non_negative(query, "limit")
    read.offset = _non_negative(query, "offset") or 0
    for key, value in pairs:
        if key not in _READ_PARAMS:
            read.filters.append(_eq_filter(key, value))
    return read


def _plain_name(name: str, where: str) -> str:
    if not name or any(ch in name for ch in ':()!."*,'):
        raise _unsupported(f"{where} items other than plain column names ({name!r})")
    return name


def _order_term(item: str) -> tuple[str, str]:
    column, *modifiers = item.split(".")
    sql = []
    for modifier in modifiers:
        if modifier not in _ORDER_WORDS:
            raise _pgrst(400, "PGRST100", f'"failed to parse order ({item})"')
        sql.append(_ORDER_WORDS[modifier])
    return _plain_name(column, "order"), " ".join(sql)


def _non_negative(query: Mapping[str, str], key: str) -> int | None:
    raw = query.get(key)
    if raw is None:
        return None
    if not raw.isdigit():
        raise _pgrst(400, "PGRST100", f'"failed to parse {key} ({raw})"')
    return int(raw)


def _eq_filter(column: str, value: str) -> tuple[str, str]:
    if column in ("or", "and", "not.or", "not.and"):
        raise _unsupported(f"logical filters ({column}=)")
    operator, _, operand = value.partition(".")
    if operator != "eq":
        raise _unsupported(f"the filter operator {operator!r} (only eq)")
    return _plain_name(column, "filters on"), operand


def _table_not_found(name: str) -> _HttpError:
    return _pgrst(
        404, "PGRST205", f"Could not find the table '{SCHEMA}.{name}' in the schema cache"
    )


def _column_of(table: str, columns: Json, name: str) -> Json:
    column = columns.get(name)
    if not isinstance(column, dict):
        raise _pgrst(400, "42703", f"column {table}.{name} does not exist")
    return column


def _read_statement(
    table: str, qualified: str, columns: Json, read: _Read, *, count: bool
) -> _Statement:
    selected = ", ".join(_column_of(table, columns, c)["quoted"] for c in read.columns) or "*"
    conditions, args = [], []
    for name, value in read.filters:
        column = _column_of(table, columns, name)
        args.append(value)
        conditions.append(f"{column['quoted']} = ${len(args)}::text::{column['type']}")
    where = f" where {' and '.join(conditions)}" if conditions else ""
    ordering = ", ".join(
        f"{_column_of(table, columns, name)['quoted']} {direction}"
        for name, direction in read.order
    )
    order_by = f" order by {ordering}" if ordering else ""
    limit = f" limit {read.limit}" if read.limit is not None else ""
    page = f"select {selected} from {qualified}{where}{order_by}{limit} offset {read.offset}"
    total = f"(select pg_catalog.count(*) from {qualified}{where})" if count else "null::bigint"
    sql = (
        "select coalesce(pg_catalog.json_agg(pgrst_row), '[]')::text,"
        f" pg_catalog.count(pgrst_row), {total} from ({page}) pgrst_row"
    )
    return _Statement(sql, tuple(args), read_only=True)


def _content_range(offset: int, shown: int, total: int | None) -> str:
    span = f"{offset}-{offset + shown - 1}" if shown else "*"
    return f"{span}/{'*' if total is None else total}"


def _wants_count(request: web.Request) -> bool:
    prefer = request.headers.get("Prefer", "")
    return any(p.strip() == "count=exact" for p in prefer.split(","))


def _single_object(body: str) -> str:
    rows = json.loads(body)
    if len(rows) != 1:
        raise _pgrst(
            406,
            "PGRST116",
            "Cannot coerce the result to a single JSON object",
            details=f"The result contains {len(rows)} rows",
        )
    return json.dumps(rows[0])


# Tokens


def _bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for any other header."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _is_opaque_key(key: str) -> bool:
    return key.startswith(("sb_secret_", "sb_publishable_"))


def _number(claims: Json, name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _jwt_claims_invalid(f"The JWT '{name}' claim must be a number")
    return float(value)


def _check_times(claims: Json, now: float) -> None:
    """PostgREST's exp/nbf/iat checks, with its clock skew allowance."""
    exp, nbf, iat = _number(claims, "exp"), _number(claims, "nbf"), _number(claims, "iat")
    if exp is not None and now - JWT_CLOCK_SKEW_SECONDS > exp:
        raise _jwt_claims_invalid("JWT expired")
    if nbf is not None and now + JWT_CLOCK_SKEW_SECONDS < nbf:
        raise _jwt_claims_invalid("JWT not yet valid")
    if iat is not None and now + JWT_CLOCK_SKEW_SECONDS < iat:
        raise _jwt_claims_invalid("JWT issued at future")


def _decode_header(token: str) -> Json:
    parts = token.count(".") + 1
    if parts != 3:
        raise _jwt_invalid(
            f"JWSError (CompactDecodeError Invalid number of parts: Expected 3 parts; got {parts})"
        )
    try:
        return dict(jwt.get_unverified_header(token))
    except jwt.PyJWTError as exc:
        raise _jwt_invalid(f"JWSError (CompactDecodeError {exc})") from exc


# The fake


class FakeSupabase:
    """A FAKE Supabase project (gateway + PostgREST + JWKS) in front of a PostgreSQL database.

    Start it with `await FakeSupabase.start(database_url, jwt_secret=...)` in the loop the tests
    run in, and stop it with `await fake.stop()`. See the module docstring for what it fakes.
    """

    def __init__(self, pool: asyncpg.Pool, *, jwt_secret: str, ref: str = "fake") -> None:
        self._pool = pool
        self._jwt_secret = jwt_secret
        self._ref = ref
        self._signing_key = ec.generate_private_key(ec.SECP256R1())
        self._kid = secrets.token_hex(8)
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._rejection: ServiceKeyRejection | None = None
        self._rejected = 0
        self.requests: Counter[tuple[str, str]] = Counter()
        """Requests that reached PostgREST (passed the gateway and JWT checks): (role, path)."""
        self.anon_key = self.sign({"role": ANON_ROLE, **self._key_claims()})
        self.service_role_key = self.sign({"role": SERVICE_ROLE, **self._key_claims()})
        self.publishable_key = f"sb_publishable_{secrets.token_urlsafe(16)}"
        self.secret_key = f"sb_secret_{secrets.token_urlsafe(16)}"
        self._key_roles = {
            self.anon_key: ANON_ROLE,
            self.publishable_key: ANON_ROLE,
            self.service_role_key: SERVICE_ROLE,
            self.secret_key: SERVICE_ROLE,
        }

    # Life cycle

    @classmethod
    async def start(
        cls, database_url: str, *, jwt_secret: str, connect_timeout: float = 5.0, port: int = 0
    ) -> FakeSupabase:
        """Start a fake in front of `database_url` (a role that may switch to the API roles),
        on `port` (0: any free one)."""
        pool = await asyncpg.create_pool(
            database_url, min_size=0, max_size=10, timeout=connect_timeout
        )
        fake = cls(pool, jwt_secret=jwt_secret)
        fake._port = port
        try:
            await fake._listen()
        except BaseException:
            await pool.close()
            raise
        return fake

    async def stop(self) -> None:
        """Stop listening and close the database pool."""
        await self.go_down()
        await self._pool.close()

    async def go_down(self) -> None:
        """Stop listening and drop open connections: clients get connection refused."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def come_back(self) -> None:
        """Listen again, on the same port as before."""
        if self._runner is None:
            await self._listen()

    async def _listen(self) -> None:
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._runner = runner

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/auth/v1/.well-known/jwks.json", self._jwks)
        app.router.add_route("*", "/rest/v1/{tail:.*}", self._rest)
        return app

    @property
    def url(self) -> str:
        """The project URL, e.g. "http://127.0.0.1:PORT" (SUPABASE_URL)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    # Switches and counters

    def reject_service_key(self, mode: ServiceKeyRejection) -> None:
        """Refuse the service credentials from now on.

        "jwt": PostgREST refuses every service_role JWT (the legacy key, or the one the gateway
        makes for the secret key) with 401 PGRST301, as after a JWT secret rotation.
        "gateway": the gateway refuses the service_role and secret keys as apikey (401).
        """
        if mode not in ("jwt", "gateway"):
            raise ValueError(f"unknown rejection mode {mode!r}")
        self._rejection = mode

    def accept_service_key(self) -> None:
        """Undo `reject_service_key`."""
        self._rejection = None

    @property
    def rejected_service_key_requests(self) -> int:
        """How many requests were refused because of `reject_service_key`."""
        return self._rejected

    def reset_counts(self) -> None:
        self.requests.clear()
        self._rejected = 0

    # Tokens

    def sign(self, claims: Mapping[str, object], *, alg: UserTokenAlg = "HS256") -> str:
        """A JWT of `claims`: HS256 with the project's JWT secret, or ES256 with the JWKS key."""
        if alg == "ES256":
            return jwt.encode(
                dict(claims), self._signing_key, algorithm="ES256", headers={"kid": self._kid}
            )
        return jwt.encode(dict(claims), self._jwt_secret, algorithm="HS256")

    def mint_user_token(
        self,
        user_id: str | uuid.UUID,
        *,
        email: str | None = None,
        alg: UserTokenAlg = "ES256",
        ttl: float = 3600.0,
        claims: Mapping[str, object] | None = None,
    ) -> str:
        """A Supabase-shaped user access token for `user_id`, valid for `ttl` seconds.

        A negative ttl makes an expired token (PostgREST tolerates 30 s: use ttl <= -31).
        `claims` are merged last, to make odd tokens (another aud, role, iss, ...).
        """
        now = int(time.time())
        payload: dict[str, object] = {
            "iss": f"{self.url}/auth/v1",
            "sub": str(user_id),
            "aud": "authenticated",
            "exp": now + int(ttl),
            "iat": now,
            "email": email or "",
            "phone": "",
            "app_metadata": {"provider": "email", "providers": ["email"]},
            "user_metadata": {},
            "role": "authenticated",
            "aal": "aal1",
            "amr": [{"method": "password", "timestamp": now}],
            "session_id": str(uuid.uuid4()),
            "is_anonymous": False,
        }
        payload.update(claims or {})
        return self.sign(payload, alg=alg)

    def jwks(self) -> Json:
        """The public JWKS, as GET /auth/v1/.well-known/jwks.json serves it."""
        public = ECAlgorithm.to_jwk(self._signing_key.public_key(), as_dict=True)
        key = {**public, "kid": self._kid, "alg": "ES256", "use": "sig", "key_ops": ["verify"]}
        return {"keys": [key]}

    def _key_claims(self) -> Json:
        now = int(time.time())
        return {"iss": "supabase", "ref": self._ref, "iat": now, "exp": now + _FAR_FUTURE_SECONDS}

    # HTTP

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.jwks())

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        try:
            authorization = self._gateway(request)
            caller = self._authenticate(authorization)
            self.requests[(caller.role, request.path)] += 1
            return await self._postgrest(request, caller, authorization)
        except _HttpError as error:
            return error.response()

    # The API gateway

    def _gateway(self, request: web.Request) -> str | None:
        """Check the apikey; return the Authorization header PostgREST gets (or None)."""
        apikey = request.headers.get("apikey") or request.query.get("apikey")
        if not apikey:
            raise _gateway_error(
                "No API key found in request", "No `apikey` request header or url param was found."
            )
        role = self._key_roles.get(apikey)
        if role is None:
            raise _invalid_api_key()
        if role == SERVICE_ROLE and self._rejection == "gateway":
            self._rejected += 1
            raise _invalid_api_key()
        authorization = request.headers.get("Authorization")
        token = _bearer(authorization)
        if token is not None and not token.startswith("sb_"):
            return authorization
        if token is not None and token != apikey:
            raise _invalid_api_key()
        if _is_opaque_key(apikey):
            return f"Bearer {self._gateway_token(role)}"
        return f"Bearer {apikey}"

    def _gateway_token(self, role: str) -> str:
        now = int(time.time())
        claims = {"iss": "supabase", "ref": self._ref, "role": role, "iat": now, "exp": now + 60}
        return self.sign(claims)

    # PostgREST: authentication

    def _authenticate(self, authorization: str | None) -> _Caller:
        token = _bearer(authorization)
        if not token:
            return _Caller(ANON_ROLE, {"role": ANON_ROLE})
        claims = self._verify(token)
        role = claims.get("role")
        role = role if isinstance(role, str) and role else ANON_ROLE
        if role == SERVICE_ROLE and self._rejection == "jwt":
            self._rejected += 1
            raise _jwt_invalid("JWSError (JWSInvalidSignature)")
        _check_times(claims, time.time())
        return _Caller(role, claims)

    def _verify(self, token: str) -> Json:
        header = _decode_header(token)
        alg = header.get("alg")
        key = self._verification_key(alg, header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise _jwt_invalid("JWSError (JWSInvalidSignature)") from exc
        return dict(claims)

    def _verification_key(self, alg: object, kid: object) -> Any:
        if alg in _HMAC_ALGORITHMS:
            return self._jwt_secret
        if alg == "ES256" and kid in (None, self._kid):
            return self._signing_key.public_key()
        raise _jwt_invalid("JWSError (JWSInvalidSignature)")

    # PostgREST: routing

    async def _postgrest(
        self, request: web.Request, caller: _Caller, authorization: str | None
    ) -> web.StreamResponse:
        _check_profile(request)
        tail = request.match_info["tail"]
        if tail.startswith("rpc/") and request.method in ("GET", "POST"):
            return await self._rpc(request, caller, authorization, tail.removeprefix("rpc/"))
        if tail.startswith("rpc/"):
            raise _pgrst(405, "PGRST101", "Only GET and POST methods are allowed for functions")
        if tail and "/" not in tail and request.method == "GET":
            return await self._read(request, caller, authorization, tail)
        raise _unsupported(f"{request.method} {request.path}")

    async def _rpc(
        self, request: web.Request, caller: _Caller, authorization: str | None, name: str
    ) -> web.Response:
        get = request.method == "GET"
        if get:
            arguments: Json = {k: v for k, v in request.query.items() if k != "apikey"}
        else:
            arguments = await _json_object(request)

        async def prepare(conn: _Connection) -> _Statement:
            fn = await _resolve(conn, name, arguments.keys())
            return _call_statement(fn, arguments, get=get)

        statement, row = await self._run(request, caller, authorization, prepare)
        if statement.void:
            return web.Response(status=204)
        body = "null" if row is None or row[0] is None else str(row[0])
        return web.Response(text=body, content_type=_JSON, charset="utf-8")

    async def _read(
        self, request: web.Request, caller: _Caller, authorization: str | None, table: str
    ) -> web.Response:
        pairs = [(k, v) for k, v in request.query.items() if k != "apikey"]
        read = _parse_read(request.query, pairs)
        count = _wants_count(request)

        async def prepare(conn: _Connection) -> _Statement:
            found = await conn.fetchrow(_TABLE_SQL, SCHEMA, table)
            if found is None:
                raise _table_not_found(table)
            columns = json.loads(found["columns"])
            return _read_statement(table, found["qualified"], columns, read, count=count)

        _, row = await self._run(request, caller, authorization, prepare)
        assert row is not None
        body, shown, total = str(row[0]), int(row[1]), row[2]
        headers = {"Content-Range": _content_range(read.offset, shown, total)}
        if request.headers.get("Accept", "").startswith(_OBJECT_JSON):
            return web.Response(
                text=_single_object(body), content_type=_OBJECT_JSON, charset="utf-8"
            )
        return web.Response(text=body, content_type=_JSON, charset="utf-8", headers=headers)

    # PostgREST: the database

    async def _run(
        self,
        request: web.Request,
        caller: _Caller,
        authorization: str | None,
        prepare: _Prepare,
    ) -> tuple[_Statement, asyncpg.Record | None]:
        """Plan with the schema cache (as the connecting role), then run in a transaction as the
        caller: commit on success, roll back on any error."""
        conn = await self._acquire()
        try:
            statement = await prepare(conn)
            async with conn.transaction(readonly=statement.read_only):
                await self._impersonate(conn, request, caller, authorization)
                row = await conn.fetchrow(statement.sql, *statement.args)
            return statement, row
        except asyncpg.PostgresError as exc:
            raise _database_error(exc, authed=caller.authed) from exc
        except (OSError, asyncpg.InterfaceError) as exc:
            raise _connection_error(exc) from exc
        finally:
            await self._pool.release(conn)

    async def _acquire(self) -> _Connection:
        try:
            conn: _Connection = await self._pool.acquire()
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _connection_error(exc) from exc
        return conn

    async def _impersonate(
        self,
        conn: _Connection,
        request: web.Request,
        caller: _Caller,
        authorization: str | None,
    ) -> None:
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() != "apikey"}
        if authorization is not None:
            headers["authorization"] = authorization
        await conn.execute(
            _IMPERSONATE_SQL,
            json.dumps(caller.claims),
            request.method,
            request.path.removeprefix("/rest/v1"),
            json.dumps(headers),
            caller.role,
        )


def _check_profile(request: web.Request) -> None:
    header = "Accept-Profile" if request.method in ("GET", "HEAD") else "Content-Profile"
    profile = request.headers.get(header)
    if profile is not None and profile != SCHEMA:
        raise _pgrst(406, "PGRST106", f"The schema must be one of the following: {SCHEMA}")


async def _json_object(request: web.Request) -> Json:
    raw = await request.text()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _pgrst(400, "PGRST102", "Empty or invalid json") from exc
    if isinstance(body, list):
        raise _unsupported("bulk function calls (a JSON array body)")
    if not isinstance(body, dict):
        raise _pgrst(400, "PGRST102", "Empty or invalid json")
    return body
