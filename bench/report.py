"""The benchmark's one table: every run, then the ratios against their targets.

A ratio is the median over rounds of (service / its limit) measured side by side in that round;
a run's row merges its rounds (all calls over all measured seconds, percentiles of all calls).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench import users
from bench.cpu import Usage
from bench.loadgen import Result
from bench.pgbench import PgbenchResult
from bench.queue import Drained, Waits
from bench.scenarios import DEBIT_FIVE_GRANTS, HOT_ACCOUNT, USAGE_1K, USAGE_1M

# How pgbench is run: its clients, and the users it debits in the first of its rows.
PGBENCH_CLIENTS = 8
PGBENCH_USERS = users.COUNT

ECHO = "echo (bare grpc.aio) GetBalance"
# The echo server making one database call per RPC: the floors of a read and of a debit.
ECHO_SELECT = "echo + asyncpg select 1"
ECHO_DEBIT = "echo + asyncpg credit_debit"
# The Connect edge (JSON) and its floor: a bare ASGI application under the same uvicorn.
HTTP_ECHO = "echo (bare ASGI, uvicorn) POST"
CONNECT_BALANCE = "GetBalance over Connect (JSON)"
CONNECT_DEBIT = "DebitCredits over Connect (JSON)"
FLOORS = (ECHO, ECHO_SELECT, ECHO_DEBIT, HTTP_ECHO)

# (service, its floor, the least ratio of their calls/s at concurrency 32), each ratio the
# median of the rounds' (the floor measured beside the service in every round).
THROUGHPUT_TARGETS = (
    ("GetBalance", ECHO_SELECT, 0.8),
    ("DebitCredits", ECHO_DEBIT, 1.0),
    (CONNECT_BALANCE, HTTP_ECHO, 0.6),
    (CONNECT_DEBIT, HTTP_ECHO, 0.6),
    # Users with five live grants against the plain DebitCredits of the same round.
    (DEBIT_FIVE_GRANTS, "DebitCredits", 0.9),
    # GetUsage of a month for a user with a million ledger entries against one with a
    # thousand: it reads a rollup, so its cost must not grow with the ledger (within 2x).
    (USAGE_1M, USAGE_1K, 0.5),
)
# (service, its floor, the most p99 at concurrency 32 may be, as a multiple of the floor's).
P99_TARGETS = (("GetBalance", ECHO_SELECT, 1.5), ("DebitCredits", ECHO_DEBIT, 1.5))
HOT_VS_PGBENCH = 1.0
# Generations from create to SUCCEEDED a second, against CreateGeneration's own rate at 32.
QUEUE_VS_CREATE = 0.5
CREATE = "CreateGeneration"
COLD_START_SECONDS = 2.0


def merged(results: list[Result]) -> Result:
    spent = [r.cpu for r in results if r.cpu is not None]
    return Result(
        calls=sum(r.calls for r in results),
        errors=sum(r.errors for r in results),
        seconds=sum(r.seconds for r in results),
        latencies_ms=[value for r in results for value in r.latencies_ms],
        cpu=sum(spent, Usage(0.0, 0.0)) if len(spent) == len(results) else None,
    )


def cpu_cells(per_call: Usage | None) -> str:
    """CPU per call in microseconds: all of it, the server's and the database's."""
    if per_call is None:
        return " | | "
    server, database = per_call.server * 1e6, per_call.database * 1e6
    return f"{server + database:,.0f} | {server:,.0f} | {database:,.0f}"


@dataclass
class Report:
    machine: str
    processes: int
    load_processes: int
    cold_start: float = float("nan")
    # pgbench per round: over the bench's users, and on one user's row.
    pgbench: list[PgbenchResult] = field(default_factory=list)
    pgbench_hot: list[PgbenchResult] = field(default_factory=list)
    runs: dict[tuple[str, int], list[Result]] = field(default_factory=dict)
    queue_drained: Drained | None = None
    queue_waits: Waits | None = None
    # Webhook events delivered per second to a local receiver (bench/webhooks.py).
    webhook_events_per_second: float | None = None

    def add(self, name: str, concurrency: int, result: Result) -> None:
        self.runs.setdefault((name, concurrency), []).append(result)

    def ratios(self, name: str, limit: list[float]) -> list[float]:
        """Per round: the service's calls/s at 32 over its limit's in the same round."""
        return [run.throughput / base for run, base in zip(self.runs[name, 32], limit, strict=True)]

    def _measured(self, *names: str) -> bool:
        rounds = {len(self.runs.get((name, 32), [])) for name in names}
        return len(rounds) == 1 and rounds != {0}

    def per_round(self, name: str, floor: str) -> list[float]:
        """Per round: `name`'s calls/s at 32 over its floor's."""
        return self.ratios(name, [r.throughput for r in self.runs[floor, 32]])

    def p99_per_round(self, name: str, floor: str) -> list[float]:
        pairs = zip(self.runs[name, 32], self.runs[floor, 32], strict=True)
        return [run.percentile(0.99) / base.percentile(0.99) for run, base in pairs]

    def tails_per_round(self, name: str) -> list[float]:
        """Per round: `name`'s p99 over its mean latency at 32, the tail's shape apart from the
        calls a second (with a fixed number of callers, the mean is the callers over them)."""
        return [run.percentile(0.99) / run.mean() for run in self.runs[name, 32]]

    def checks(self) -> list[tuple[str, float, str, bool]]:
        """(what, measured, target, met) for every target whose runs were measured."""
        found: list[tuple[str, float, str, bool]] = []
        for name, floor, least in THROUGHPUT_TARGETS:
            if self._measured(name, floor):
                ratio = statistics.median(self.per_round(name, floor))
                found.append((f"{name} / {floor}, c32", ratio, f">= {least:g}", ratio >= least))
        for name, floor, most in P99_TARGETS:
            if self._measured(name, floor):
                ratio = statistics.median(self.p99_per_round(name, floor))
                what = f"{name} p99 / {floor} p99, c32"
                found.append((what, ratio, f"<= {most:g}", ratio <= most))
        if self._measured(HOT_ACCOUNT) and len(self.pgbench_hot) == len(self.runs[HOT_ACCOUNT, 32]):
            ratio = statistics.median(self.ratios(HOT_ACCOUNT, [r.tps for r in self.pgbench_hot]))
            what = f"{HOT_ACCOUNT} c32 / pgbench one user"
            found.append((what, ratio, f">= {HOT_VS_PGBENCH:g}", ratio >= HOT_VS_PGBENCH))
        if self.queue_drained is not None and (CREATE, 32) in self.runs:
            ratio = self.queue_drained.per_second / merged(self.runs[CREATE, 32]).throughput
            what = "generations create to SUCCEEDED / CreateGeneration, c32"
            found.append((what, ratio, f">= {QUEUE_VS_CREATE:g}", ratio >= QUEUE_VS_CREATE))
        found.append(
            (
                "cold start to SERVING (s)",
                self.cold_start,
                f"< {COLD_START_SECONDS:g}",
                self.cold_start < COLD_START_SECONDS,
            )
        )
        return found

    def all_met(self) -> bool:
        return all(met for *_, met in self.checks())

    def render(self) -> str:
        lines = [
            f"machine: {self.machine}",
            f"server processes: {self.processes}; load generator processes: "
            f"{self.load_processes}; rounds: {len(self.pgbench)}",
            "",
            "| run | concurrency | calls/s | CPU µs/call | server | database | p50 ms | p99 ms "
            "| errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for what, rounds in (
            (f"pgbench credit_debit, {PGBENCH_USERS:,} users", self.pgbench),
            ("pgbench credit_debit, one user", self.pgbench_hot),
        ):
            if rounds:
                tps = statistics.median(r.tps for r in rounds)
                cpu = _median_usage([r.cpu_per_call for r in rounds])
                lines.append(
                    f"| {what} | {PGBENCH_CLIENTS} | {tps:,.0f} | {cpu_cells(cpu)} | | | |"
                )
        for (name, concurrency), results in sorted(self.runs.items()):
            result = merged(results)
            lines.append(
                f"| {name} | {concurrency} | {result.throughput:,.0f} | "
                f"{cpu_cells(result.cpu_per_call())} | "
                f"{result.percentile(0.5):.2f} | {result.percentile(0.99):.2f} | {result.errors} |"
            )
        lines += ["", "| target | measured | wanted | met |", "|---|---:|---:|---|"]
        for what, value, wanted, met in self.checks():
            lines.append(f"| {what} | {value:.2f} | {wanted} | {'yes' if met else 'NO'} |")
        lines += ["", "Per round:"]
        for name, floor, _ in THROUGHPUT_TARGETS:
            if self._measured(name, floor):
                lines.append(f"- {name} / {floor}: {_listed(self.per_round(name, floor))}")
        for name, floor, _ in P99_TARGETS:
            if self._measured(name, floor):
                lines.append(
                    f"- {name} p99 / {floor} p99: {_listed(self.p99_per_round(name, floor))}"
                )
                lines.append(
                    f"- {name} p99 / its mean: {_listed(self.tails_per_round(name))}; "
                    f"{floor}'s: {_listed(self.tails_per_round(floor))}"
                )
        if self._measured(HOT_ACCOUNT) and len(self.pgbench_hot) == len(self.runs[HOT_ACCOUNT, 32]):
            hot = self.ratios(HOT_ACCOUNT, [r.tps for r in self.pgbench_hot])
            lines.append(f"- {HOT_ACCOUNT} / pgbench one user: {_listed(hot)}")
        lines += self._queue_lines()
        if self.webhook_events_per_second is not None:
            lines.append(f"Webhook deliveries: {self.webhook_events_per_second:,.0f} events/s.")
        return "\n".join(lines)

    def _queue_lines(self) -> list[str]:
        lines = []
        if self.queue_drained is not None:
            drained = self.queue_drained
            lines.append(
                f"Generation queue (demo provider, no delay): of the generations CreateGeneration "
                f"made at 32, {drained.succeeded:,} SUCCEEDED ({drained.others} did not), "
                f"{drained.per_second:,.0f} a second from the first's create to the last's "
                "success."
            )
        if self.queue_waits is not None:
            waits = self.queue_waits
            lines.append(
                f"Create to RUNNING, {len(waits.waits_ms):,} generations created at "
                f"{waits.rate:,.0f} a second (half CreateGeneration's rate): "
                f"p50 {waits.percentile(0.5):.1f} ms, p99 {waits.percentile(0.99):.1f} ms."
            )
        return lines


def _listed(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _median_usage(values: list[Usage | None]) -> Usage | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return Usage(
        statistics.median(v.server for v in known), statistics.median(v.database for v in known)
    )
