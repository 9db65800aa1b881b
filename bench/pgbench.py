"""The limit of the database: pgbench calling the service's own debit function, as the service
role, for many users at once. pgbench ships in the pgserver wheel beside postgres."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from bench.cpu import Usage, Watch
from server.db import embedded

# One call a transaction, exactly the statement the service sends (named arguments), for a user
# drawn at random from the bench's users (their ids are `bench.users.user_id(n)`) and a fresh
# idempotency key.
_SCRIPT = """\
\\set u random(1, {users})
select public.credit_debit(p_user_id => ('00000000-0000-4000-8000-' || lpad((:u)::text, 12, '0'))::uuid, p_amount => 1, p_idempotency_key => 'pgbench-' || gen_random_uuid()::text, p_description => 'bench', p_metadata => '{{}}'::jsonb);
"""  # noqa: E501 (pgbench reads one statement per line)


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    tps: float
    latency_ms: float
    # The database's CPU seconds per transaction (None: nothing watched).
    cpu_per_call: Usage | None = None


def run(
    database_url: str,
    users: int,
    clients: int = 8,
    seconds: int = 10,
    watch: Watch | None = None,
) -> PgbenchResult:
    """pgbench's transactions per second and mean latency over `seconds` (and, with `watch`,
    the CPU its processes spent per transaction)."""
    url = urlsplit(database_url)
    host = parse_qs(url.query).get("host", [url.hostname or "localhost"])[0]
    env = {
        **os.environ,
        "PGHOST": host,
        "PGPORT": str(url.port or 5432),
        "PGUSER": url.username or "postgres",
        "PGPASSWORD": url.password or "",
        "PGDATABASE": url.path.lstrip("/") or "postgres",
        "PGOPTIONS": "-c role=service_role",
    }
    with tempfile.TemporaryDirectory() as scratch:
        script = Path(scratch) / "debit.sql"
        script.write_text(_SCRIPT.format(users=users))
        command = [
            str(embedded.bin_dir() / "pgbench"),
            "--no-vacuum",
            f"--client={clients}",
            f"--jobs={min(clients, os.cpu_count() or 1)}",
            f"--time={seconds}",
            "--protocol=prepared",
            f"--file={script}",
        ]
        before = watch.read() if watch else None
        done = subprocess.run(  # noqa: S603 (a fixed command line)
            command, env=env, capture_output=True, text=True, check=True, timeout=seconds + 60
        )
        spent = watch.read() - before if watch and before else None
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", done.stdout)
    count = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    if tps is None or latency is None or count is None:
        raise RuntimeError(f"unexpected pgbench output:\n{done.stdout}\n{done.stderr}")
    calls = max(1, int(count.group(1)))
    per_call = None if spent is None else spent / calls
    return PgbenchResult(float(tps.group(1)), float(latency.group(1)), per_call)
