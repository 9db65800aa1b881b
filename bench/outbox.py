"""`python -m bench.outbox`: the database CPU a debit spends on the events outbox.

`credit_debit` from one connection on a fresh embedded PostgreSQL, with the outbox's triggers
(the ledger's `transaction.created`, the profile's thresholds and watchers) off, one of them,
or both, in ABBA order; each run's cost is the backend's CPU time (read from /proc, so a busy
neighbour on a shared machine weighs less than on wall time) per debit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import uuid
from pathlib import Path

import asyncpg

from bench import servers

TRIGGERS = {
    "ledger": "alter table public.credit_transactions {} trigger credit_transactions_event",
    "profile": "alter table public.credit_profiles {} trigger credit_profiles_balance_event",
}
MODES = {"none": (), "ledger": ("ledger",), "profile": ("profile",), "both": ("ledger", "profile")}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def debit_cost(
    conn: asyncpg.Connection, users: list[uuid.UUID], count: int, tag: str
) -> float:
    """Microseconds of backend CPU per debit, over `count` debits."""
    pid = await conn.fetchval("select pg_backend_pid()")
    start = cpu_seconds(pid)
    for i in range(count):
        await conn.execute(
            "select public.credit_debit($1, 1, $2, '', '{}')", users[i % len(users)], f"{tag}-{i}"
        )
    return (cpu_seconds(pid) - start) / count * 1e6


async def measure(url: str, rounds: int, count: int) -> dict[str, list[float]]:
    conn = await asyncpg.connect(url)
    try:
        users = [uuid.uuid4() for _ in range(50)]
        for user in users:
            await conn.execute("select public.credit_provision_profile($1, '')", user)
            await conn.execute("select public.credit_grant($1, 100000000, 'g', '', '{}')", user)
        await conn.execute("select public.credit_configure_events('{100}', 259200)")
        costs: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_ in range(rounds):
            for mode in [*MODES, *reversed(MODES)]:
                for name, statement in TRIGGERS.items():
                    await conn.execute(
                        statement.format("enable" if name in MODES[mode] else "disable")
                    )
                tag = f"{round_}-{mode}-{len(costs[mode])}"
                costs[mode].append(await debit_cost(conn, users, count, tag))
        return costs
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="ABBA rounds")
    parser.add_argument("--debits", type=int, default=2000, help="debits per run")
    args = parser.parse_args(argv)
    with servers.migrated_database() as url:
        costs = asyncio.run(measure(url, args.rounds, args.debits))
    base = statistics.median(costs["none"])
    for mode, values in costs.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"{mode:>8}: {median:.0f} µs of database CPU per debit ({median / base:.2f}; {runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
