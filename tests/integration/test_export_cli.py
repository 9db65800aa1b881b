"""`credits export` (issue 20): the ledger streamed as CSV or JSON Lines, batch by batch. A user
with 100 000 ledger entries is exported with the memory of a user with none, give or take a
generous margin (the peak RSS of the command, measured by the command's own process)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

ROWS = 100_000
# What exporting 100 000 entries may add to the command's peak memory. Holding them all would
# take several times this (each entry decoded from JSON and built into a record).
RSS_MARGIN_KIB = 40 * 1024

# Runs `credits` and reports its own peak RSS (KiB) on stderr's last line.
MEASURED = (
    "import resource, sys\n"
    "from server.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def export(database_url: str, *args: str, output: Path) -> int:
    """Runs `credits export ARGS` into `output`; returns its peak RSS in KiB."""
    env = {**os.environ, "DATABASE_URL": database_url, "SUPABASE_JWT_SECRET": "x" * 32}
    with output.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-c", MEASURED, "export", *args],
            stdout=out,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    return int(done.stderr.strip().splitlines()[-1].split()[1])


@pytest.fixture
async def owner(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def a_user_with(owner: asyncpg.Connection, entries: int) -> uuid.UUID:
    """A user whose ledger is `entries` alternating grants and debits of 1 (balance 0), written
    by one statement as the owner with triggers off (as a restore would)."""
    user = uuid.uuid4()
    await owner.execute("select public.credit_provision_profile($1, '')", user)
    async with owner.transaction():
        await owner.execute("set local session_replication_role = replica")
        await owner.execute(
            "insert into public.credit_transactions (user_id, kind, amount, balance_after,"
            " idempotency_key, fingerprint, description, metadata)"
            " select $1, case when n % 2 = 0 then 'grant' else 'debit' end, 1, 1 - n % 2,"
            " 'k' || n, 'fp', 'entry ' || n, jsonb_build_object('n', n::text)"
            " from generate_series(0, $2 - 1) n",
            user,
            entries,
        )
    return user


async def test_export_of_100k_entries_streams_in_bounded_memory(
    owner: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    empty = await a_user_with(owner, 0)
    big = await a_user_with(owner, ROWS)
    baseline = export(
        database_url, "--user", str(empty), "--format", "jsonl", output=tmp_path / "empty"
    )
    peak = export(database_url, "--user", str(big), "--format", "jsonl", output=tmp_path / "big")

    lines = (tmp_path / "big").read_text().splitlines()
    assert len(lines) == ROWS
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    assert (first["kind"], first["description"], first["metadata"]) == (
        "grant",
        "entry 0",
        {"n": "0"},
    )
    assert (last["kind"], last["idempotency_key"]) == ("debit", f"k{ROWS - 1}")
    assert (tmp_path / "empty").read_text() == ""
    assert peak - baseline < RSS_MARGIN_KIB, (peak, baseline)


async def test_csv_export_of_a_user_and_of_every_user_in_a_time_range(
    owner: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    user = await a_user_with(owner, 4)
    export(database_url, "--user", str(user), output=tmp_path / "one.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "one.csv").read_text())))
    assert [(r["kind"], r["amount"], r["user_id"]) for r in rows] == [
        ("grant", "1", str(user)),
        ("debit", "1", str(user)),
        ("grant", "1", str(user)),
        ("debit", "1", str(user)),
    ]
    assert json.loads(rows[0]["metadata"]) == {"n": "0"}
    assert json.loads(rows[0]["allocations"]) == []
    since = rows[0]["create_time"]
    export(database_url, "--all", "--since", since, "--format", "jsonl", output=tmp_path / "all")
    everyone = [json.loads(line) for line in (tmp_path / "all").read_text().splitlines()]
    mine = [r["transaction_id"] for r in everyone if r["user_id"] == str(user)]
    assert mine == [r["transaction_id"] for r in rows]
    assert all(r["create_time"] >= since for r in everyone)
