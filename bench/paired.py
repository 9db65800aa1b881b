"""`python -m bench.paired REV`: this checkout against another revision, in paired runs.

Both versions serve at once, each from its own code (REV from a git worktree) and on its own
database of one embedded PostgreSQL, with the same bench users. Each round drives every
scenario at the head, then the base, then the base, then the head (ABBA), so a neighbour's load
on this shared machine weighs on both alike; the report is the median head/base ratio of calls
per second, per scenario. A change costs nothing beyond noise when the ratio's range holds 1.0.
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
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from bench import loadgen, scenarios, servers, users
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


def serve(
    code: Path, database_url: str, secret: str, log: Path
) -> tuple[str, contextlib.AbstractContextManager[subprocess.Popen[bytes]]]:
    """`credits serve` of the code at `code` (its own modules first on the path)."""
    address = f"127.0.0.1:{servers.free_port()}"
    env = {
        "DATABASE_URL": database_url,
        "SUPABASE_JWT_SECRET": secret,
        "CREDITS_LISTEN": address,
        "CREDITS_HTTP_LISTEN": "",  # no Connect edge (a revision without one ignores this)
        "PYTHONPATH": os.pathsep.join((str(code), str(code / "gen" / "python"))),
    }
    command = [sys.executable, "-c", "from server.cli import main; raise SystemExit(main())"]
    # In `code`: `python -c` puts its working directory first on the path, and this one's
    # server package would shadow the base's.
    return address, servers.running([*command, "serve"], servers.clean_env(env), log, cwd=code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__)
    parser.add_argument("rev", help="the base revision (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    ratios: dict[str, list[float]] = {}
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
                head, head_server = serve(ROOT, head_url, secret, log)
                base, base_server = serve(base_code, base_url, secret, log)
                with head_server, base_server:
                    for target, url in ((head, head_url), (base, base_url)):
                        servers.wait_serving(target)
                        asyncio.run(users.create(url, users.COUNT))
                    for scenario in (scenarios.get_balance(tokens), scenarios.debit(tokens)):
                        for round_ in range(args.rounds):
                            print(f"paired: {scenario.name} round {round_ + 1}", file=sys.stderr)
                            rates = {head: 0.0, base: 0.0}
                            for target in (head, base, base, head):
                                load = loadgen.Load(
                                    target,
                                    scenario,
                                    args.concurrency,
                                    processes=os.cpu_count() or 1,
                                    seconds=args.seconds,
                                )
                                rates[target] += loadgen.run(load).throughput
                            ratios.setdefault(scenario.name, []).append(rates[head] / rates[base])
        except BaseException:
            print(log.read_text() if log.exists() else "", file=sys.stderr)
            raise
        finally:
            database.stop()
    print(f"head / {args.rev}, calls per second at concurrency {args.concurrency}:")
    for name, values in ratios.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {name:<14} median {statistics.median(values):.2f}  (rounds: {shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
