"""`make bench`: one run that measures the limits of this machine and the service against them.

  1. cold start: `credits serve` on an empty data dir until health says SERVING;
  2. the database's limit: pgbench calling the debit function for many users at 8 clients;
  3. the transport's limit: a bare grpc.aio echo server (bench/echo.py);
  4. the service: GetBalance, DebitCredits and CreateGeneration at concurrency 1 and 32, and
     DebitCredits of users with five live grants beside the plain one;
  5. the Connect edge: GetBalance and DebitCredits as JSON at 32, beside a bare ASGI echo under
     the same uvicorn (bench/http_echo.py), their floor,
  6. webhook delivery: events delivered per second to a local receiver (bench/webhooks.py),

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

from bench import http_loadgen, loadgen, machine, pgbench, scenarios, servers, users, webhooks
from bench.report import (
    CONNECT_BALANCE,
    CONNECT_DEBIT,
    ECHO,
    ECHO_DEBIT,
    ECHO_SELECT,
    HTTP_ECHO,
    Report,
)
from server.db import embedded, migrate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of each limit beside what it limits"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=int(os.environ.get("CREDITS_PROCESSES") or 1),
        help="server processes, for the service and the echo server alike (CREDITS_PROCESSES)",
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
        asyncio.run(users.create(database.uri, users.COUNT))
        asyncio.run(users.create_with_grants(database.uri, users.COUNT))
        secret = secrets.token_urlsafe(32)
        tokens = users.tokens(secret, users.COUNT)
        five_grants = scenarios.debit_five_grants(users.tokens_with_grants(secret, users.COUNT))
        echo, service, connect = (f"127.0.0.1:{servers.free_port()}" for _ in range(3))
        settings = {
            **serving,
            "DATABASE_URL": database.uri,
            "SUPABASE_JWT_SECRET": secret,
            "CREDITS_LISTEN": service,
            "CREDITS_HTTP_LISTEN": connect,
        }
        echo_port = int(echo.rsplit(":", 1)[1])
        with (
            servers.echo_serve(echo_port, args.processes, log),
            servers.credits_serve(settings, log),
        ):
            servers.wait_ready(echo)
            servers.wait_serving(service)
            balance, debit = scenarios.get_balance(tokens), scenarios.debit(tokens)
            # Each limit is measured right beside what is compared with it, round after round,
            # so a neighbour's load on this shared machine weighs on both alike.
            for round_ in range(1, args.rounds + 1):
                say(
                    f"round {round_}/{args.rounds}: pgbench, DebitCredits (1 and 5 grants), "
                    "echo, GetBalance"
                )
                report.pgbench.append(pgbench.run(database.uri, users.COUNT, clients=8, seconds=5))
                report.add(debit.name, 32, _drive(args, service, debit, 32))
                report.add(five_grants.name, 32, _drive(args, service, five_grants, 32))
                report.add(ECHO, 32, _drive(args, echo, balance, 32))
                report.add(balance.name, 32, _drive(args, service, balance, 32))
            say("the Connect edge: ASGI echo, GetBalance, DebitCredits (JSON)")
            http_echo = f"127.0.0.1:{servers.free_port()}"
            with servers.http_echo_serve(int(http_echo.rsplit(":", 1)[1]), args.processes, log):
                servers.wait_http(http_echo, "/")
                servers.wait_http(connect)
                for round_ in range(1, args.rounds + 1):
                    say(f"round {round_}/{args.rounds}: ASGI echo, GetBalance, DebitCredits")
                    report.add(HTTP_ECHO, 32, _drive_http(args, http_echo, balance, 32))
                    report.add(CONNECT_BALANCE, 32, _drive_http(args, connect, balance, 32))
                    report.add(CONNECT_DEBIT, 32, _drive_http(args, connect, debit, 32))
            say("floors: echo with one database call per RPC")
            for mode, name in (("select1", ECHO_SELECT), ("debit", ECHO_DEBIT)):
                floor = f"127.0.0.1:{servers.free_port()}"
                port = int(floor.rsplit(":", 1)[1])
                with servers.echo_serve(port, args.processes, log, mode, database.uri):
                    servers.wait_ready(floor)
                    report.add(name, 32, _drive(args, floor, balance, 32))
            say("one caller at a time, and generations")
            report.add(ECHO, 1, _drive(args, echo, balance, 1))
            report.add(balance.name, 1, _drive(args, service, balance, 1))
            report.add(debit.name, 1, _drive(args, service, debit, 1))
            # Last: the generations it queues keep the workers busy for a while after.
            generation = scenarios.create_generation(tokens)
            for concurrency in (1, 32):
                report.add(
                    generation.name, concurrency, _drive(args, service, generation, concurrency)
                )
        say("webhook delivery throughput")
        report.webhook_events_per_second = asyncio.run(webhooks.measure(database.uri))
    finally:
        database.stop()


def _drive(
    args: argparse.Namespace, target: str, scenario: scenarios.Scenario, concurrency: int
) -> loadgen.Result:
    load = loadgen.Load(
        target, scenario, concurrency, processes=args.load_processes, seconds=args.seconds
    )
    return loadgen.run(load)


def _drive_http(
    args: argparse.Namespace, target: str, scenario: scenarios.Scenario, concurrency: int
) -> loadgen.Result:
    load = loadgen.Load(
        target, scenario, concurrency, processes=args.load_processes, seconds=args.seconds
    )
    return http_loadgen.run(load)


def say(what: str) -> None:
    print(f"bench: {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
