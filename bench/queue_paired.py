"""`python -m bench.queue_paired REV`: the generation queue of this checkout against REV's, in
paired runs (the queue row of `make bench` alone, in about a minute).

Both versions serve at once (as in `bench.paired`: REV from a git worktree, each on its own
database of one embedded PostgreSQL, the bench's catalogue: the demo model at no delay). Each
round drives CreateGeneration at 32 callers for `--seconds` at the head, then the base, then the
base, then the head (ABBA), each time waiting for the queue to drain; a run's figure is the
ratio `make bench` reports: generations a second from create to SUCCEEDED over
CreateGeneration's own rate. Also printed: the CPU (server, database) per generation over the
create and the drain together. `--waits` also measures create-to-RUNNING at half rate.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg

from bench import loadgen, queue, scenarios, servers, users
from bench.cpu import Watch
from bench.paired import ROOT, Served, create_database, serve, worktree
from server.db import embedded

MODELS = Path(__file__).with_name("models.toml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_paired", description=__doc__)
    parser.add_argument("rev", help="the base revision (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="CreateGeneration's time")
    parser.add_argument("--waits", action="store_true", help="create to RUNNING at half rate too")
    parser.add_argument("--workers", default="", help="CREDITS_WORKERS of both servers")
    parser.add_argument(
        "--waits-sampled",
        action="store_true",
        help="sample what the database's backends wait on (pg_stat_activity) during each run",
    )
    args = parser.parse_args(argv)
    extra = {
        "CREDITS_MODELS": str(MODELS),
        "CREDITS_MAX_ACTIVE_GENERATIONS": "1000000",
        **({"CREDITS_WORKERS": args.workers} if args.workers else {}),
    }
    ratios: dict[str, list[float]] = {"head": [], "base": []}
    with tempfile.TemporaryDirectory(prefix="credits-queue-") as scratch_dir:
        scratch = Path(scratch_dir)
        log = scratch / "servers.log"
        database = embedded.EmbeddedPostgres.start_blocking(scratch / "db")
        try:
            with worktree(args.rev, scratch) as base_code:
                urls = {n: asyncio.run(create_database(database.uri, n)) for n in ("head", "base")}
                secret = secrets.token_urlsafe(32)
                tokens = users.tokens(secret, users.COUNT)
                head, head_server = serve(
                    ROOT, urls["head"], secret, log, connect=False, extra=extra
                )
                base, base_server = serve(
                    base_code, urls["base"], secret, log, connect=False, extra=extra
                )
                db = (database.pid,) if database.pid else ()
                with head_server as head_process, base_server as base_process:
                    sides: dict[str, tuple[Served, Watch]] = {
                        "head": (head, Watch((head_process.pid,), db)),
                        "base": (base, Watch((base_process.pid,), db)),
                    }
                    for name, (served, _) in sides.items():
                        servers.wait_serving(served.grpc)
                        asyncio.run(users.create(urls[name], users.COUNT))
                    scenario = scenarios.create_generation(tokens)
                    for round_ in range(args.rounds):
                        for name in ("head", "base", "base", "head"):
                            served, watch = sides[name]
                            ratio = _run(served, watch, urls[name], scenario, args, name)
                            ratios[name].append(ratio)
                        print(f"queue: round {round_ + 1} done", file=sys.stderr)
        except BaseException:
            print(log.read_text() if log.exists() else "", file=sys.stderr)
            raise
        finally:
            database.stop()
    pairs = [h / b for h, b in zip(ratios["head"], ratios["base"], strict=True)]
    for name, values in ratios.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name}: SUCCEEDED/s over create/s median {statistics.median(values):.2f} ({shown})")
    print(f"head / base per pair: median {statistics.median(pairs):.2f}")
    return 0


def _run(
    served: Served,
    watch: Watch,
    url: str,
    scenario: scenarios.Scenario,
    args: argparse.Namespace,
    name: str,
) -> float:
    start = asyncio.run(queue.since(url))
    sampler = _Sampler(url) if args.waits_sampled else None
    before, began = watch.read(), time.perf_counter()
    load = loadgen.Load(
        served.grpc, scenario, 32, processes=os.cpu_count() or 1, seconds=args.seconds
    )
    created = loadgen.run(load)
    ended = asyncio.run(queue.since(url))
    if sampler:
        print(f"  {name} while creating: {sampler.take()}")
    drained = asyncio.run(queue.drained(url, start))
    spent, seconds = watch.read() - before, time.perf_counter() - began
    if sampler:
        print(f"  {name} draining: {sampler.take()}")
        sampler.stop()
    jobs = drained.succeeded + drained.others
    ratio = drained.per_second / created.throughput
    after = asyncio.run(_after(url, start, ended))
    line = (
        f"{name}: create {created.throughput:,.0f}/s, SUCCEEDED {drained.per_second:,.0f}/s"
        f" ({drained.succeeded} ok, {drained.others} not) ratio {ratio:.2f};"
        f" CPU per generation server {spent.server / jobs * 1e6:,.0f} µs,"
        f" database {spent.database / jobs * 1e6:,.0f} µs over {seconds:.1f} s;"
        f" {after}"
    )
    if args.waits:
        waits = asyncio.run(
            queue.waits(
                served.grpc, scenario, url, created.throughput / 2, args.seconds, f"waits-{start}"
            )
        )
        line += (
            f"; at {waits.rate:,.0f}/s create to RUNNING p50 {waits.percentile(0.5):,.1f}"
            f" p99 {waits.percentile(0.99):,.1f} ms"
        )
    print(line, flush=True)
    return ratio


async def _after(url: str, start: object, ended: object) -> str:
    """How many jobs were done when the creating stopped, and the rate of the rest."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "select count(*) filter (where updated_at < $2) as before,"
            " count(*) filter (where updated_at >= $2) as after,"
            " extract(epoch from max(updated_at) - $2) as seconds"
            " from public.credit_generations where created_at >= $1 and state = 'succeeded'",
            start,
            ended,
        )
    finally:
        await conn.close()
    assert row is not None
    rate = row["after"] / float(row["seconds"] or 1)
    return f"{row['before']} done while creating, the other {row['after']} at {rate:,.0f}/s"


class _Sampler:
    """What the service's backends are doing, sampled every 10 ms in a thread of its own: the
    mean number of backends per (state, wait event) since the last `take`."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._counts: collections.Counter[str] = collections.Counter()
        self._samples = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._sample()), daemon=True)
        self._thread.start()

    async def _sample(self) -> None:
        conn = await asyncpg.connect(self._url)
        try:
            while not self._stopping.is_set():
                rows = await conn.fetch(
                    "select state, coalesce(wait_event_type || ':' || wait_event, 'CPU') as w"
                    " from pg_stat_activity where application_name = 'credits'"
                    " and state <> 'idle'"
                )
                self._samples += 1
                self._counts.update(f"{r['w']}" for r in rows)
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    def take(self) -> str:
        counts, samples = self._counts, max(1, self._samples)
        self._counts, self._samples = collections.Counter(), 0
        return ", ".join(f"{w} {n / samples:.2f}" for w, n in counts.most_common(6))

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


if __name__ == "__main__":
    sys.exit(main())
