"""Apply the shipped migrations to a PostgreSQL, recording them as the Supabase CLI does.

The migration files are package data, `server/db/migrations/*.sql` (read through
importlib.resources, so an installed wheel finds them too); the repository's
`supabase/migrations` is a symlink to that directory for `supabase db push`.

Applied versions live in `supabase_migrations.schema_migrations`, the CLI's own table, so this
runner and `supabase db push` agree on what is applied. Everything runs under one advisory lock:
servers starting together apply each migration once, the later ones wait and find nothing to do.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

import asyncpg

_logger = logging.getLogger(__name__)

# Traversables, not paths: a pathlib.Path for an ordinary install, but a zip or any other
# importer's resources work too. A Path given in their place (tests, tools) is one as well.
MIGRATIONS_DIR: Traversable = resources.files("server.db") / "migrations"
BOOTSTRAP_SQL: Traversable = resources.files("server.db") / "bootstrap.sql"

# Any fixed bigint works; this one spells "credits" plus 1 in ASCII to stay recognisable.
MIGRATION_LOCK_KEY = 0x63726564697473_01

# The Supabase CLI layout: `<14-digit timestamp>_<name>.sql`.
_FILE_PATTERN = re.compile(r"^(?P<version>[0-9]{14})_(?P<name>.+)\.sql$")

_CREATE_HISTORY = (
    "create schema if not exists supabase_migrations",
    "create table if not exists supabase_migrations.schema_migrations (version text primary key)",
    "alter table supabase_migrations.schema_migrations add column if not exists statements text[]",
    "alter table supabase_migrations.schema_migrations add column if not exists name text",
)
_RECORD = (
    "insert into supabase_migrations.schema_migrations (version, statements, name)"
    " values ($1, $2, $3)"
)


class MigrationError(Exception):
    """A migration file is misnamed or failed to apply; the message names the file."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: `version` orders it, `name` is what follows the first underscore."""

    version: str
    name: str
    path: Traversable


def discover(migrations_dir: Traversable = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in `migrations_dir`, in version order; hidden files are ignored."""
    if not migrations_dir.is_dir():
        raise MigrationError(f"migrations directory not found: {migrations_dir}")
    found: dict[str, Migration] = {}
    for path in sorted(migrations_dir.iterdir(), key=lambda entry: entry.name):
        if path.name.startswith("."):
            continue  # .gitkeep and editor files
        match = _FILE_PATTERN.match(path.name)
        if match is None or not path.is_file():
            raise MigrationError(
                f"{path}: not a migration file; expected <14-digit timestamp>_<name>.sql"
            )
        version = match["version"]
        if version in found:
            raise MigrationError(
                f"{path}: version {version} is also used by {found[version].path.name}"
            )
        found[version] = Migration(version, match["name"], path)
    return [found[version] for version in sorted(found)]


async def migrate(
    conn_or_url: asyncpg.Connection | str,
    *,
    migrations_dir: Traversable = MIGRATIONS_DIR,
    bootstrap: bool = True,
) -> list[str]:
    """Bring the database up to date; return the versions applied by this call, in order.

    With `bootstrap`, first create what Supabase provides and plain PostgreSQL lacks (roles,
    `auth` schema); a real Supabase database is recognised and never bootstrapped. Each
    migration runs in its own transaction with its record; a failure rolls back that migration
    only and raises.
    """
    migrations = discover(migrations_dir)
    async with _connection(conn_or_url) as conn, _advisory_lock(conn):
        if bootstrap and not await is_supabase(conn):
            await conn.execute(BOOTSTRAP_SQL.read_text(encoding="utf-8"))
        for statement in _CREATE_HISTORY:
            await conn.execute(statement)
        done = await _applied(conn)
        applied: list[str] = []
        for migration in migrations:
            if migration.version in done:
                continue
            await _apply(conn, migration)
            applied.append(migration.version)
        return applied


async def pending(
    conn_or_url: asyncpg.Connection | str, *, migrations_dir: Traversable = MIGRATIONS_DIR
) -> list[str]:
    """The versions in `migrations_dir` that the database has not recorded as applied."""
    migrations = discover(migrations_dir)
    async with _connection(conn_or_url) as conn:
        done = await _applied(conn)
    return [m.version for m in migrations if m.version not in done]


async def is_supabase(conn: asyncpg.Connection) -> bool:
    """True on a Supabase project's database, which has its own auth schema and roles."""
    found: bool = await conn.fetchval(
        "select exists (select 1 from pg_catalog.pg_roles where rolname = 'supabase_auth_admin')"
    )
    return found


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    sql = migration.path.read_text(encoding="utf-8")
    try:
        async with conn.transaction():
            # No arguments: the simple query protocol, so a file may hold many statements. The
            # trailing no-op keeps an empty or comment-only file (as `supabase migration new`
            # makes) from being an empty query, which asyncpg cannot handle.
            await conn.execute(sql + "\n;select 1")
            await conn.execute(_RECORD, migration.version, [sql], migration.name)
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"migration {migration.path.name} failed: {exc}") from exc
    _logger.info("applied migration %s", migration.path.name)


async def _applied(conn: asyncpg.Connection) -> set[str]:
    table = await conn.fetchval("select to_regclass('supabase_migrations.schema_migrations')")
    if table is None:
        return set()
    rows = await conn.fetch("select version from supabase_migrations.schema_migrations")
    return {row["version"] for row in rows}


@asynccontextmanager
async def _connection(conn_or_url: asyncpg.Connection | str) -> AsyncIterator[asyncpg.Connection]:
    """Use the caller's connection as is, or open (and close) one for a URL."""
    if not isinstance(conn_or_url, str):
        yield conn_or_url
        return
    conn = await asyncpg.connect(conn_or_url)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def _advisory_lock(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Hold the session-level migration lock; waits while another session holds it."""
    await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        yield
    finally:
        if not conn.is_closed():
            await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


__all__ = ["MIGRATIONS_DIR", "Migration", "MigrationError", "discover", "migrate", "pending"]
