"""`credits check-config`'s migration and reachability checks on a Supabase project: the FAKE
Supabase in front of a database of its own, migrated with a chosen part of the migrations.

The migrations line names every migration of ours the project has not recorded (through
credit_schema_versions()); a project older than that function is compared by its newest
version; a project that cannot be reached says so, on every line that needed it, instead of
blaming the migrations.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from server import checks
from server.config import Settings
from server.db import migrate
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.server import TEST_JWT_SECRET

SHIPPED = migrate.discover()
VERSIONS_FUNCTION = next(m for m in SHIPPED if m.name == "credits_schema_versions")
VERSION_FUNCTION = next(m for m in SHIPPED if m.name == "credits_schema_version")

Project = Callable[[list[migrate.Migration]], Awaitable[FakeSupabase]]


def named(migrations: list[migrate.Migration]) -> str:
    return ", ".join(f"{m.version}_{m.name}" for m in migrations)


def settings_for(url: str, anon_key: str = "anon", service_key: str = "service") -> Settings:
    return Settings(
        supabase_url=url,
        supabase_anon_key=anon_key,
        supabase_service_role_key=service_key,
        jwt_secret=TEST_JWT_SECRET,
    )


async def check_lines(settings: Settings) -> dict[str, checks.Check]:
    return {check.name: check for check in await checks.run(settings)}


@pytest.fixture
async def project(fresh_database_url: str, tmp_path: Path) -> AsyncIterator[Project]:
    """Makes the project: its database migrated with the migrations given, the fake before it."""
    fakes: list[FakeSupabase] = []

    async def make(migrations: list[migrate.Migration]) -> FakeSupabase:
        chosen = tmp_path / "migrations"
        chosen.mkdir()
        for migration in migrations:
            shutil.copyfile(
                str(migration.path), chosen / f"{migration.version}_{migration.name}.sql"
            )
        await migrate.migrate(fresh_database_url, migrations_dir=chosen)
        fake = await FakeSupabase.start(fresh_database_url, jwt_secret=TEST_JWT_SECRET)
        fakes.append(fake)
        return fake

    try:
        yield make
    finally:
        for fake in fakes:
            await fake.stop()


async def test_every_migration_recorded_is_all_applied(project: Project) -> None:
    fake = await project(SHIPPED)
    lines = await check_lines(settings_for(fake.url, fake.anon_key, fake.service_role_key))
    assert lines["service key accepted"].ok, lines["service key accepted"].line()
    assert lines["migrations applied"].line() == "OK   migrations applied: all applied"


async def test_the_missing_migrations_are_named(project: Project, fresh_database_url: str) -> None:
    fake = await project(SHIPPED)
    gone = [SHIPPED[1], SHIPPED[-1]]
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute(
            "delete from supabase_migrations.schema_migrations where version = any($1::text[])",
            [m.version for m in gone],
        )
        # A project's own migrations are recorded beside ours; they are not ours to miss.
        await conn.execute(
            "insert into supabase_migrations.schema_migrations (version, name)"
            " values ('20300101000000', 'the_apps_own')"
        )
    finally:
        await conn.close()
    check = (await check_lines(settings_for(fake.url, fake.anon_key, fake.service_role_key)))[
        "migrations applied"
    ]
    assert not check.ok
    assert check.detail == f"missing: {named(gone)}"
    assert "supabase db push" in check.hint
    assert "supabase/migrations/" in check.hint


async def test_a_project_without_the_version_list_is_compared_by_its_newest(
    project: Project,
) -> None:
    older = [m for m in SHIPPED if m.version < VERSIONS_FUNCTION.version]
    fake = await project(older)
    check = (await check_lines(settings_for(fake.url, fake.anon_key, fake.service_role_key)))[
        "migrations applied"
    ]
    newer = [m for m in SHIPPED if m.version > older[-1].version]
    assert not check.ok
    assert check.detail == (f"missing: {named(newer)} (the newest applied is {older[-1].version})")


async def test_a_project_older_still_is_told_the_newest_is_missing(project: Project) -> None:
    fake = await project([m for m in SHIPPED if m.version < VERSION_FUNCTION.version])
    check = (await check_lines(settings_for(fake.url, fake.anon_key, fake.service_role_key)))[
        "migrations applied"
    ]
    assert not check.ok
    assert check.detail.startswith(f"missing: {named(SHIPPED[-1:])} (PGRST202: ")


async def test_an_unreachable_project_is_not_reported_as_missing_migrations() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        lines = await check_lines(settings_for(url))
    for name in ("service key accepted", "migrations applied"):
        assert lines[name].line() == (
            f"FAIL {name}: cannot reach {url} (ConnectError)\n"
            f"       hint: {checks.UNREACHABLE_HINT}"
        )
    assert lines["anon key accepted"].detail == "unreachable (ConnectError)"
