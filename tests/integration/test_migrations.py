"""The migration runner against a real PostgreSQL, with migration files written per test."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from server.db.migrate import (
    MIGRATIONS_DIR,
    MigrationError,
    discover,
    is_supabase,
    migrate,
    pending,
)
from tests.fixtures.database import database_of

V1, V2, V3 = "20250101000000", "20250102000000", "20250103000000"


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


async def fetch_history(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "select version, name, statements from supabase_migrations.schema_migrations"
            " order by version"
        )
    finally:
        await conn.close()


async def test_applies_in_order_and_records_versions(
    fresh_database_url: str, tmp_path: Path
) -> None:
    # Written out of order on purpose; v2 depends on v1.
    migrations = write(
        tmp_path / "m",
        {
            f"{V2}_add_column.sql": "alter table t add column b int;",
            f"{V1}_create_t.sql": "create table t (a int);\ninsert into t values (1);",
            ".gitkeep": "",
        },
    )
    assert await pending(fresh_database_url, migrations_dir=migrations) == [V1, V2]

    assert await migrate(fresh_database_url, migrations_dir=migrations) == [V1, V2]

    history = await fetch_history(fresh_database_url)
    assert [(r["version"], r["name"]) for r in history] == [(V1, "create_t"), (V2, "add_column")]
    assert history[0]["statements"] == [(migrations / f"{V1}_create_t.sql").read_text()]
    assert await pending(fresh_database_url, migrations_dir=migrations) == []


async def test_second_run_applies_nothing(fresh_database_url: str, tmp_path: Path) -> None:
    migrations = write(tmp_path / "m", {f"{V1}_create_t.sql": "create table t (a int);"})
    assert await migrate(fresh_database_url, migrations_dir=migrations) == [V1]
    assert await migrate(fresh_database_url, migrations_dir=migrations) == []

    write(migrations, {f"{V2}_more.sql": "create table u (a int);"})
    assert await migrate(fresh_database_url, migrations_dir=migrations) == [V2]


async def test_failing_migration_rolls_back_alone_and_names_the_file(
    fresh_database_url: str, tmp_path: Path
) -> None:
    migrations = write(
        tmp_path / "m",
        {
            f"{V1}_good.sql": "create table good (a int);",
            f"{V2}_bad.sql": "create table half (a int);\nselect * from no_such_table;",
            f"{V3}_later.sql": "create table later (a int);",
        },
    )
    with pytest.raises(MigrationError, match=f"{V2}_bad.sql") as caught:
        await migrate(fresh_database_url, migrations_dir=migrations)
    assert isinstance(caught.value.__cause__, asyncpg.UndefinedTableError)

    conn = await asyncpg.connect(fresh_database_url)
    try:
        tables = await conn.fetch(
            "select tablename from pg_tables where schemaname = 'public' order by 1"
        )
        assert [r["tablename"] for r in tables] == ["good"]
        # The lock was released: another session can take it at once.
        assert await conn.fetchval("select pg_try_advisory_lock(x'6372656469747301'::bigint)")
    finally:
        await conn.close()
    assert [r["version"] for r in await fetch_history(fresh_database_url)] == [V1]
    assert await pending(fresh_database_url, migrations_dir=migrations) == [V2, V3]


@pytest.mark.parametrize(
    "name",
    ["2025_short.sql", f"{V1}.sql", f"{V1}_no_suffix.txt", "notes.md", f"{V1}-dash.sql"],
)
async def test_bad_file_name_is_rejected(tmp_path: Path, name: str) -> None:
    migrations = write(tmp_path / "m", {f"{V1}_ok.sql": "select 1;", name: "select 1;"})
    # Rejected before connecting: the URL is never used.
    with pytest.raises(MigrationError, match=name):
        await migrate("postgresql://invalid.invalid/x", migrations_dir=migrations)


async def test_duplicate_version_is_rejected(tmp_path: Path) -> None:
    migrations = write(tmp_path / "m", {f"{V1}_a.sql": "select 1;", f"{V1}_b.sql": "select 1;"})
    with pytest.raises(MigrationError, match=V1):
        await migrate("postgresql://invalid.invalid/x", migrations_dir=migrations)


async def test_concurrent_runs_apply_each_migration_once(
    fresh_database_url: str, tmp_path: Path
) -> None:
    migrations = write(
        tmp_path / "m",
        {
            f"{V1}_counter.sql": "create table runs (n int);",
            # pg_sleep widens the window in which a second runner could slip in.
            f"{V2}_count.sql": "insert into runs values (1); select pg_sleep(0.2);",
            f"{V3}_count.sql": "insert into runs values (1);",
        },
    )
    first = await asyncpg.connect(fresh_database_url)
    second = await asyncpg.connect(fresh_database_url)
    try:
        results = await asyncio.gather(
            migrate(first, migrations_dir=migrations),
            migrate(second, migrations_dir=migrations),
        )
        assert sorted(results) == [[], [V1, V2, V3]]
        assert await first.fetchval("select count(*) from runs") == 2
    finally:
        await first.close()
        await second.close()


async def test_bootstrap_provides_supabase_roles_and_auth(
    fresh_database_url: str, tmp_path: Path
) -> None:
    await migrate(fresh_database_url, migrations_dir=write(tmp_path / "m", {}))
    conn = await asyncpg.connect(fresh_database_url)
    try:
        roles = await conn.fetch(
            "select rolname, rolbypassrls from pg_roles"
            " where rolname in ('anon', 'authenticated', 'service_role') order by rolname"
        )
        assert [(r["rolname"], r["rolbypassrls"]) for r in roles] == [
            ("anon", False),
            ("authenticated", False),
            ("service_role", True),
        ]
        sub = "6f1c2a9e-3b1d-4c55-9a4e-0d7a1f0b8c21"
        claims = json.dumps({"sub": sub, "role": "authenticated"})
        async with conn.transaction():
            await conn.execute("select set_config('request.jwt.claims', $1, true)", claims)
            assert str(await conn.fetchval("select auth.uid()")) == sub
            assert await conn.fetchval("select auth.role()") == "authenticated"
        assert await conn.fetchval("select auth.uid()") is None
    finally:
        await conn.close()


async def test_missing_migrations_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="not found"):
        await migrate("postgresql://invalid.invalid/x", migrations_dir=tmp_path / "absent")


async def test_empty_and_comment_only_migrations_apply(
    fresh_database_url: str, tmp_path: Path
) -> None:
    migrations = write(
        tmp_path / "m", {f"{V1}_empty.sql": "", f"{V2}_comments.sql": "-- to do\n/* later */"}
    )
    assert await migrate(fresh_database_url, migrations_dir=migrations) == [V1, V2]


def test_the_supabase_cli_reads_the_packaged_migrations() -> None:
    # `supabase db push` reads supabase/migrations at the repository root: a symlink to the
    # package's directory, so the CLI and an installed server apply the very same files.
    cli_dir = Path(__file__).resolve().parents[2] / "supabase" / "migrations"
    assert cli_dir.is_symlink()
    assert cli_dir.resolve() == Path(str(MIGRATIONS_DIR)).resolve()
    assert [m.version for m in discover(cli_dir)] == [m.version for m in discover()]


async def test_session_database_has_every_migration(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        migrations = MIGRATIONS_DIR if MIGRATIONS_DIR.is_dir() else None
        if migrations is not None:
            assert await pending(conn, migrations_dir=migrations) == []
        assert await conn.fetchval("select current_database()") == database_of(database_url)
    finally:
        await conn.close()


async def test_a_supabase_database_is_never_bootstrapped(
    fresh_database_url: str, tmp_path: Path
) -> None:
    # Supabase's own auth.uid() must survive: simulate a project that has its auth admin role
    # and its own auth functions, then migrate with bootstrap requested.
    conn = await asyncpg.connect(fresh_database_url)
    try:
        role_existed = await conn.fetchval(
            "select exists (select 1 from pg_roles where rolname = 'supabase_auth_admin')"
        )
        if not role_existed:
            await conn.execute("create role supabase_auth_admin nologin")
        try:
            await conn.execute("create schema auth")
            await conn.execute(
                "create function auth.uid() returns uuid language sql"
                " as $$ select '00000000-0000-0000-0000-00000000beef'::uuid $$"
            )
            assert await is_supabase(conn)
            await migrate(conn, migrations_dir=tmp_path, bootstrap=True)
            assert await conn.fetchval("select auth.uid()::text") == (
                "00000000-0000-0000-0000-00000000beef"
            )
        finally:
            await conn.execute("drop schema auth cascade")
            if not role_existed:
                await conn.execute("drop role supabase_auth_admin")
    finally:
        await conn.close()
