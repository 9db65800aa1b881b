"""`python -m bench.debits REV`: the database CPU of a debit, this checkout's SQL against REV's.

One embedded PostgreSQL, two databases: one migrated with this checkout's migrations, one with
REV's (read from git), each with the bench's users. One connection to each calls
`credit_debit` (or, with `--each N`, `credit_debit_each` with N calls) as the service does, for
users drawn at random, in batches that alternate between the two in random order; the cost of
a batch is its backend's CPU time from /proc/<pid>/schedstat (nanoseconds), so a neighbour on a
shared machine weighs on both alike and the ratio holds still where calls per second do not.
Commits are asynchronous unless `--sync`: the commit's flush is the same for both and only
hides the SQL's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import asyncpg

from bench import users
from server.db import embedded, migrate

ROOT = Path(__file__).resolve().parents[1]
MIGRATIONS = "server/db/migrations"

DEBIT = (
    "select public.credit_debit(p_user_id => $1, p_amount => 1, p_idempotency_key => $2,"
    " p_description => 'bench', p_metadata => '{}'::jsonb)"
)
EACH = (
    "select * from public.credit_debit_each($1::uuid[], $2::bigint[], $3::text[], $4::text[],"
    " $5::jsonb[])"
)


def migrations_of(rev: str, into: Path) -> Path:
    """REV's migrations, written into `into`."""
    git = ["git", "-C", str(ROOT)]
    names = subprocess.run(  # noqa: S603 (a fixed command line)
        [*git, "ls-tree", "--name-only", f"{rev}:{MIGRATIONS}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    into.mkdir()
    for name in names:
        text = subprocess.run(  # noqa: S603
            [*git, "show", f"{rev}:{MIGRATIONS}/{name}"], check=True, capture_output=True
        ).stdout
        (into / name).write_bytes(text)
    return into


async def prepare(admin_uri: str, name: str, migrations: Path) -> str:
    """A database `name`, migrated with `migrations`, with the bench's users: its URL."""
    conn = await asyncpg.connect(admin_uri)
    try:
        await conn.execute(f"create database {name}")  # a fixed name: "head" or "base"
    finally:
        await conn.close()
    url = admin_uri.replace("/postgres?", f"/{name}?", 1)
    await migrate.migrate(url, migrations_dir=migrations)
    await users.create(url, users.COUNT)
    return url


def any_user() -> uuid.UUID:
    """One of the bench's users, drawn at random (not for secrets: S311)."""
    return users.user_id(random.randint(1, users.COUNT))  # noqa: S311


class Side:
    """One database's connection, as the service role, and its backend."""

    def __init__(self, conn: asyncpg.Connection, pid: int, each: int) -> None:
        self.conn = conn
        self.pid = pid
        self.each = each
        self.nanoseconds = 0
        self.debits = 0

    def cpu(self) -> int:
        return int(Path(f"/proc/{self.pid}/schedstat").read_text().split()[0])

    async def debit(self, count: int) -> None:
        """`count` debits of random users (in calls of `each` when batched)."""
        for _ in range(count // max(self.each, 1)):
            if self.each:
                drawn = [any_user() for _ in range(self.each)]
                await self.conn.fetch(
                    EACH,
                    drawn,
                    [1] * self.each,
                    [f"bench-{uuid.uuid4()}" for _ in drawn],
                    ["bench"] * self.each,
                    ["{}"] * self.each,
                )
            else:
                await self.conn.fetchval(DEBIT, any_user(), f"bench-{uuid.uuid4()}")

    async def measured(self, count: int) -> None:
        start = self.cpu()
        await self.debit(count)
        self.nanoseconds += self.cpu() - start
        self.debits += count

    @property
    def microseconds(self) -> float:
        return self.nanoseconds / self.debits / 1000


async def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Side]:
    settings = {"role": "service_role"}
    if not args.sync:
        settings["synchronous_commit"] = "off"
    sides: dict[str, Side] = {}
    for name, url in urls.items():
        conn = await asyncpg.connect(url, server_settings=settings)
        sides[name] = Side(conn, await conn.fetchval("select pg_backend_pid()"), args.each)
    try:
        for side in sides.values():  # plans made, caches warm
            await side.debit(100)
        for _ in range(args.batches):
            order = list(sides.values())
            random.shuffle(order)
            for side in order:
                await side.measured(args.size)
    finally:
        for side in sides.values():
            await side.conn.close()
    return sides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.debits", description=__doc__)
    parser.add_argument("rev", help="the base revision (a commit, tag or branch)")
    parser.add_argument("--batches", type=int, default=30, help="batches per side")
    parser.add_argument("--size", type=int, default=160, help="debits per batch")
    parser.add_argument("--each", type=int, default=0, help="calls per credit_debit_each")
    parser.add_argument("--sync", action="store_true", help="synchronous commits")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="credits-debits-") as scratch_dir:
        scratch = Path(scratch_dir)
        database = embedded.EmbeddedPostgres.start_blocking(scratch / "db")
        try:
            base = migrations_of(args.rev, scratch / "base-migrations")
            urls = {
                "head": asyncio.run(prepare(database.uri, "head", ROOT / MIGRATIONS)),
                "base": asyncio.run(prepare(database.uri, "base", base)),
            }
            sides = asyncio.run(measure(urls, args))
        finally:
            database.stop()
    head, base_side = sides["head"], sides["base"]
    form = f"credit_debit_each of {args.each}" if args.each else "credit_debit"
    print(f"database CPU per debit ({form}), {head.debits} debits a side:")
    print(f"  head {head.microseconds:.0f} µs, {args.rev} {base_side.microseconds:.0f} µs,")
    print(f"  head / base {head.microseconds / base_side.microseconds:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
