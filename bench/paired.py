"""`python -m bench.paired REV`: this checkout against another revision, in paired runs.

Both versions serve at once, each from its own code (REV from a git worktree) and on its own
database of one embedded PostgreSQL, with the same bench users. Each round drives every
scenario at the head, then the base, then the base, then the head (ABBA), so a neighbour's load
on this shared machine weighs on both alike; the report is the median head/base ratio of calls
per second, per scenario, and of CPU per call (the server's and the database's, which moves
far less than throughput on a shared machine). A change costs nothing beyond noise when the
ratio's range holds 1.0. `--connect` drives the same calls over the Connect edge (JSON) too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import http_loadgen, loadgen, scenarios, servers, users
from bench.cpu import Usage, Watch
from server.db import embedded

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def worktree(rev: str, scratch: Path) -> Iterator[Path]:
    """A checkout of `rev`, removed afterwards."""
    path = scratch / "base"
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(path), rev], check=True)  # noqa: S603
    try:
        yield path
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)  # noqa: S603


DATABASES = {"head": "create database head", "base": "create database base"}


async def create_database(admin_uri: str, name: str) -> str:
    conn = await asyncpg.connect(admin_uri)
    try:
        await conn.execute(DATABASES[name])
    finally:
        await conn.close()
    return admin_uri.replace("/postgres?", f"/{name}?", 1)


@dataclass(frozen=True, slots=True)
class Served:
    """One version's addresses: gRPC's, and the Connect edge's ("" when not served)."""

    grpc: str
    connect: str


def serve(
    code: Path,
    database_url: str,
    secret: str,
    log: Path,
    *,
    connect: bool,
    extra: Mapping[str, str] | None = None,
) -> tuple[Served, contextlib.AbstractContextManager[subprocess.Popen[bytes]]]:
    """`credits serve` of the code at `code` (its own modules first on the path), with its
    Connect edge if `connect`, and the `extra` settings."""
    served = Served(
        f"127.0.0.1:{servers.free_port()}",
        f"127.0.0.1:{servers.free_port()}" if connect else "",
    )
    env = {
        "DATABASE_URL": database_url,
        "SUPABASE_JWT_SECRET": secret,
        "CREDITS_LISTEN": served.grpc,
        "CREDITS_HTTP_LISTEN": served.connect,
        "PYTHONPATH": os.pathsep.join((str(code), str(code / "gen" / "python"))),
        **(extra or {}),
    }
    command = [sys.executable, "-c", "from server.cli import main; raise SystemExit(main())"]
    # In the checkout: `python -c` puts its working directory first on the path, before
    # PYTHONPATH, so from anywhere else the base would import this checkout's code.
    return served, servers.running([*command, "serve"], servers.clean_env(env), log, cwd=code)


def drive(
    served: Served,
    scenario: scenarios.Scenario,
    over_connect: bool,
    args: argparse.Namespace,
    watch: Watch,
) -> loadgen.Result:
    """One run of `scenario` against one version, over gRPC or Connect."""
    load = loadgen.Load(
        served.connect if over_connect else served.grpc,
        scenario,
        args.concurrency,
        processes=os.cpu_count() or 1,
        seconds=args.seconds,
    )
    return http_loadgen.run(load, watch) if over_connect else loadgen.run(load, watch=watch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__)
    parser.add_argument("rev", help="the base revision (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--connect", action="store_true", help="over the Connect edge (JSON) too")
    parser.add_argument(
        "--only-connect", action="store_true", help="over the Connect edge (JSON) only"
    )
    args = parser.parse_args(argv)
    connect = args.connect or args.only_connect
    ratios: dict[str, list[float]] = {}
    # Per scenario and round: each side's CPU per call (server, database), over its two runs.
    spent: dict[str, list[dict[str, Usage]]] = {}
    with tempfile.TemporaryDirectory(prefix="credits-paired-") as scratch_dir:
        scratch = Path(scratch_dir)
        log = scratch / "servers.log"
        database = embedded.EmbeddedPostgres.start_blocking(scratch / "db")
        try:
            with worktree(args.rev, scratch) as base_code:
                head_url, base_url = (
                    asyncio.run(create_database(database.uri, name)) for name in ("head", "base")
                )
                secret = secrets.token_urlsafe(32)
                tokens = users.tokens(secret, users.COUNT)
                head, head_server = serve(ROOT, head_url, secret, log, connect=connect)
                base, base_server = serve(base_code, base_url, secret, log, connect=connect)
                db = (database.pid,) if database.pid else ()
                with head_server as head_process, base_server as base_process:
                    watches = {
                        head: Watch((head_process.pid,), db),
                        base: Watch((base_process.pid,), db),
                    }
                    for served, url in ((head, head_url), (base, base_url)):
                        servers.wait_serving(served.grpc)
                        if served.connect:
                            servers.wait_http(served.connect)
                        asyncio.run(users.create(url, users.COUNT))
                    transports = ([] if args.only_connect else [False]) + (
                        [True] if connect else []
                    )
                    for over_connect in transports:
                        for scenario in (scenarios.get_balance(tokens), scenarios.debit(tokens)):
                            name = scenario.name + (" (Connect)" if over_connect else "")
                            for round_ in range(args.rounds):
                                print(f"paired: {name} round {round_ + 1}", file=sys.stderr)
                                rates = {head: 0.0, base: 0.0}
                                cpu = {head: Usage(0.0, 0.0), base: Usage(0.0, 0.0)}
                                calls = {head: 0, base: 0}
                                for served in (head, base, base, head):
                                    result = drive(
                                        served, scenario, over_connect, args, watches[served]
                                    )
                                    rates[served] += result.throughput
                                    cpu[served] += result.cpu or Usage(0.0, 0.0)
                                    calls[served] += result.calls
                                ratios.setdefault(name, []).append(rates[head] / rates[base])
                                spent.setdefault(name, []).append(
                                    {
                                        side: cpu[served] / max(1, calls[served])
                                        for side, served in (("head", head), ("base", base))
                                    }
                                )
        except BaseException:
            print(log.read_text() if log.exists() else "", file=sys.stderr)
            raise
        finally:
            database.stop()
    print(f"head / {args.rev} at concurrency {args.concurrency}, calls per second:")
    for name, values in ratios.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {name:<25} median {statistics.median(values):.2f}  (rounds: {shown})")
    for part in ("server", "database"):
        print(f"CPU per call of the {part}, head / base:")
        for name, rounds in spent.items():
            each = [(getattr(r["head"], part), getattr(r["base"], part)) for r in rounds]
            values = [h / b if b else float("nan") for h, b in each]
            shown = ", ".join(f"{v:.2f}" for v in values)
            head_us, base_us = (statistics.median(side) * 1e6 for side in zip(*each, strict=True))
            print(
                f"  {name:<25} median {statistics.median(values):.2f}  (rounds: {shown}; "
                f"{head_us:,.0f} µs against {base_us:,.0f} µs)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
