"""`make bench`: one run that measures the limits of this machine and the service against them.

  1. cold start: `credits serve` on an empty data dir until health says SERVING;
  2. the database's limit: pgbench calling the debit function for many users at 8 clients, and
     for one user (a hot row);
  3. the floors: a bare grpc.aio echo server (bench/echo.py), and the same making one database
     call per RPC (`select 1`, or the debit function), each measured in every round beside the
     service's call it is the floor of;
  4. the service: GetBalance, DebitCredits and CreateGeneration at concurrency 1 and 32,
     DebitCredits of users with five live grants beside the plain one, and 32 callers debiting
     one user (beside pgbench's one-user figure);
  5. the Connect edge: GetBalance and DebitCredits as JSON at 32, beside a bare ASGI echo under
     the same uvicorn (bench/http_echo.py), their floor;
  6. webhook delivery: events delivered per second to a local receiver (bench/webhooks.py),

then one table with throughput, CPU per call (the server's and the database's), p50/p99
latency, and the ratios against their targets (exit status 1 while one is missed). The
database, servers and load share this machine's cores; only ratios of one run mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
from pathlib import Path

from bench import (
    http_loadgen,
    loadgen,
    machine,
    pgbench,
    queue,
    scenarios,
    servers,
    users,
    webhooks,
)
from bench.cpu import Watch
from bench.report import (
    CONNECT_BALANCE,
    CONNECT_DEBIT,
    ECHO,
    ECHO_DEBIT,
    ECHO_SELECT,
    HTTP_ECHO,
    PGBENCH_CLIENTS,
    PGBENCH_USERS,
    Report,
)
from server.db import embedded, migrate

# The bench's catalogue: the demo model with no delay.
MODELS = Path(__file__).with_name("models.toml")


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
        asyncio.run(users.create_with_usage(database.uri))
        secret = secrets.token_urlsafe(32)
        tokens = users.tokens(secret, users.COUNT)
        five_grants = scenarios.debit_five_grants(users.tokens_with_grants(secret, users.COUNT))
        service, connect = (f"127.0.0.1:{servers.free_port()}" for _ in range(2))
        settings = {
            **serving,
            "DATABASE_URL": database.uri,
            "SUPABASE_JWT_SECRET": secret,
            "CREDITS_LISTEN": service,
            "CREDITS_HTTP_LISTEN": connect,
            "CREDITS_MODELS": str(MODELS),
            # CreateGeneration's load piles generations up faster than workers end them: the
            # cap on active generations would refuse them instead of measuring their cost.
            "CREDITS_MAX_ACTIVE_GENERATIONS": "1000000",
        }
        db = (database.pid,) if database.pid else ()
        with contextlib.ExitStack() as running:
            # The floors of gRPC: bare, and with one database call per RPC.
            floors: dict[str, tuple[str, Watch]] = {}
            for name, mode in ((ECHO, "echo"), (ECHO_SELECT, "select1"), (ECHO_DEBIT, "debit")):
                port = servers.free_port()
                process = running.enter_context(
                    servers.echo_serve(port, args.processes, log, mode, database.uri)
                )
                floors[name] = (f"127.0.0.1:{port}", Watch((process.pid,), db))
            service_process = running.enter_context(servers.credits_serve(settings, log))
            for address, _ in floors.values():
                servers.wait_ready(address)
            servers.wait_serving(service)
            # What each row is charged for: its server's processes and the database's.
            on_service = Watch((service_process.pid,), db)
            balance, debit = scenarios.get_balance(tokens), scenarios.debit(tokens)
            hot = scenarios.debit_hot(tokens[0])

            def floor(name: str, concurrency: int = 32) -> None:
                address, watch = floors[name]
                report.add(name, concurrency, _drive(args, address, balance, concurrency, watch))

            def served(scenario: scenarios.Scenario, concurrency: int = 32) -> None:
                report.add(
                    scenario.name,
                    concurrency,
                    _drive(args, service, scenario, concurrency, on_service),
                )

            # Each floor is measured right beside what is compared with it, round after round,
            # so a neighbour's load on this shared machine weighs on both alike.
            for round_ in range(1, args.rounds + 1):
                say(
                    f"round {round_}/{args.rounds}: pgbench (many users, one), DebitCredits "
                    "(1 and 5 grants, one hot account) and its floor, GetBalance and its floor"
                )
                for rows, users_debited in (
                    (report.pgbench, PGBENCH_USERS),
                    (report.pgbench_hot, 1),
                ):
                    rows.append(
                        pgbench.run(database.uri, users_debited, PGBENCH_CLIENTS, 5, Watch((), db))
                    )
                served(debit)
                floor(ECHO_DEBIT)
                served(five_grants)
                served(hot)
                served(balance)
                floor(ECHO_SELECT)
                floor(ECHO)
            say("the Connect edge: ASGI echo, GetBalance, DebitCredits (JSON)")
            http_echo = f"127.0.0.1:{servers.free_port()}"
            http_port = int(http_echo.rsplit(":", 1)[1])
            with servers.http_echo_serve(http_port, args.processes, log) as http_process:
                servers.wait_http(http_echo, "/")
                servers.wait_http(connect)
                on_http = Watch((http_process.pid,), db)
                for round_ in range(1, args.rounds + 1):
                    say(f"round {round_}/{args.rounds}: ASGI echo, GetBalance, DebitCredits")
                    report.add(HTTP_ECHO, 32, _drive_http(args, http_echo, balance, 32, on_http))
                    report.add(
                        CONNECT_BALANCE, 32, _drive_http(args, connect, balance, 32, on_service)
                    )
                    report.add(CONNECT_DEBIT, 32, _drive_http(args, connect, debit, 32, on_service))
            say("GetUsage of a month by day: a user with 1k ledger entries, one with 1M")
            month = [
                scenarios.usage(name, users.token_with_usage(secret, entries))
                for name, entries in zip(
                    (scenarios.USAGE_1K, scenarios.USAGE_1M), users.USAGE_ENTRIES, strict=True
                )
            ]
            for _ in range(args.rounds):
                for scenario in month:
                    served(scenario)
            say("one caller at a time, and generations")
            floor(ECHO, 1)
            served(balance, 1)
            served(debit, 1)
            # Last: the generations it queues keep the workers busy for a while after.
            generation = scenarios.create_generation(tokens)
            served(generation, 1)
            say("the generation queue: create to SUCCEEDED, and create to RUNNING at half rate")
            start = asyncio.run(queue.since(database.uri))
            served(generation, 32)
            report.queue_drained = asyncio.run(queue.drained(database.uri, start))
            rate = report.runs[generation.name, 32][-1].throughput / 2
            report.queue_waits = asyncio.run(
                queue.waits(service, generation, database.uri, rate, args.seconds)
            )
        say("webhook delivery throughput")
        report.webhook_events_per_second = asyncio.run(webhooks.measure(database.uri))
    finally:
        database.stop()


def _load(
    args: argparse.Namespace, target: str, scenario: scenarios.Scenario, concurrency: int
) -> loadgen.Load:
    return loadgen.Load(
        target, scenario, concurrency, processes=args.load_processes, seconds=args.seconds
    )


def _drive(
    args: argparse.Namespace,
    target: str,
    scenario: scenarios.Scenario,
    concurrency: int,
    watch: Watch,
) -> loadgen.Result:
    return loadgen.run(_load(args, target, scenario, concurrency), watch=watch)


def _drive_http(
    args: argparse.Namespace,
    target: str,
    scenario: scenarios.Scenario,
    concurrency: int,
    watch: Watch,
) -> loadgen.Result:
    return http_loadgen.run(_load(args, target, scenario, concurrency), watch)


def say(what: str) -> None:
    print(f"bench: {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
