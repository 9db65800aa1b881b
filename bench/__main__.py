"""`make bench`: one run that measures the limits of this machine and the service against them.

  1. cold start: `credits serve` on an empty data dir until health says SERVING;
  2. the database's limit: pgbench calling the debit function for many users at 8 clients;
  3. the transport's limit: a bare grpc.aio echo server (bench/echo.py);
  4. the service: GetBalance, DebitCredits and CreateGeneration at concurrency 1 and 32,

then one table with throughput, p50/p99 latency, and the ratios against their targets. The
database, servers and load share this machine's cores; only ratios of one run mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
from pathlib import Path

from bench import loadgen, machine, pgbench, scenarios, servers, users
from bench.report import Report, Row
from server.db import embedded, migrate

USERS = 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument(
        "--processes",
        type=int,
        default=int(os.environ.get("CREDITS_PROCESSES") or os.cpu_count() or 1),
        help="server processes, for the service and the echo server alike (default: cores)",
    )
    parser.add_argument(
        "--load-processes", type=int, default=os.cpu_count() or 1, help="load generator processes"
    )
    args = parser.parse_args(argv)
    report = Report(machine.describe(), args.processes, args.load_processes)
    with tempfile.TemporaryDirectory(prefix="credits-bench-") as scratch:
        root = Path(scratch)
        log = root / "servers.log"
        try:
            _run(args, root, log, report)
        except BaseException:
            print(
                f"-- server output --\n{log.read_text() if log.exists() else ''}", file=sys.stderr
            )
            raise
    print(report.render())
    return 0 if report.all_met() else 1


def _run(args: argparse.Namespace, root: Path, log: Path, report: Report) -> None:
    serving = {"CREDITS_PROCESSES": str(args.processes)}
    say("cold start")
    report.cold_start = servers.cold_start(root / "cold", log, serving)

    say("database: start, migrate, create users")
    database = embedded.EmbeddedPostgres.start_blocking(root / "db")
    try:
        asyncio.run(migrate.migrate(database.uri))
        asyncio.run(users.create(database.uri, USERS))
        say("pgbench")
        report.pgbench = pgbench.run(database.uri, USERS, clients=8, seconds=10)

        secret = secrets.token_urlsafe(32)
        tokens = users.tokens(secret, USERS)
        port = servers.free_port()
        target = f"127.0.0.1:{port}"
        with servers.echo_serve(port, args.processes, log):
            servers.wait_ready(target)
            for concurrency in (1, 32):
                say(f"echo at {concurrency}")
                report.echo[concurrency] = _drive(
                    args, target, scenarios.get_balance(tokens), concurrency
                )

        port = servers.free_port()
        target = f"127.0.0.1:{port}"
        settings = {
            **serving,
            "DATABASE_URL": database.uri,
            "SUPABASE_JWT_SECRET": secret,
            "CREDITS_LISTEN": target,
        }
        with servers.credits_serve(settings, log):
            servers.wait_serving(target)
            for make in (scenarios.get_balance, scenarios.debit, scenarios.create_generation):
                scenario = make(tokens)
                for concurrency in (1, 32):
                    say(f"{scenario.name} at {concurrency}")
                    result = _drive(args, target, scenario, concurrency)
                    report.rows.append(Row(scenario.name, concurrency, result))
    finally:
        database.stop()


def _drive(
    args: argparse.Namespace, target: str, scenario: scenarios.Scenario, concurrency: int
) -> loadgen.Result:
    load = loadgen.Load(
        target, scenario, concurrency, processes=args.load_processes, seconds=args.seconds
    )
    return loadgen.run(load)


def say(what: str) -> None:
    print(f"bench: {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
