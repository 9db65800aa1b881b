"""The benchmark's one table: every run, then the ratios against their targets.

A ratio is the median over rounds of (service / its limit) measured side by side in that round;
a run's row merges its rounds (all calls over all measured seconds, percentiles of all calls).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench.loadgen import Result
from bench.pgbench import PgbenchResult
from bench.scenarios import DEBIT_FIVE_GRANTS

ECHO = "echo (bare grpc.aio) GetBalance"
# The echo server making one database call per RPC: the floors of a read and of a debit.
ECHO_SELECT = "echo + asyncpg select 1"
ECHO_DEBIT = "echo + asyncpg credit_debit"
# The Connect edge (JSON) and its floor: a bare ASGI application under the same uvicorn.
HTTP_ECHO = "echo (bare ASGI, uvicorn) POST"
CONNECT_BALANCE = "GetBalance over Connect (JSON)"
CONNECT_DEBIT = "DebitCredits over Connect (JSON)"
CONNECT_VS_HTTP_ECHO = 0.6
DEBIT_VS_PGBENCH = 0.35
# DebitCredits of users with five live grants, against the plain DebitCredits of the same
# round: within 10 %.
FIVE_GRANTS_VS_DEBIT = 0.9
BALANCE_VS_ECHO = 0.6
P99_MS_AT_32 = 10.0
COLD_START_SECONDS = 5.0


def merged(results: list[Result]) -> Result:
    return Result(
        calls=sum(r.calls for r in results),
        errors=sum(r.errors for r in results),
        seconds=sum(r.seconds for r in results),
        latencies_ms=[value for r in results for value in r.latencies_ms],
    )


@dataclass
class Report:
    machine: str
    processes: int
    load_processes: int
    cold_start: float = float("nan")
    pgbench: list[PgbenchResult] = field(default_factory=list)
    runs: dict[tuple[str, int], list[Result]] = field(default_factory=dict)
    # Webhook events delivered per second to a local receiver (bench/webhooks.py).
    webhook_events_per_second: float | None = None

    def add(self, name: str, concurrency: int, result: Result) -> None:
        self.runs.setdefault((name, concurrency), []).append(result)

    def ratios(self, name: str, limit: list[float]) -> list[float]:
        """Per round: the service's calls/s at 32 over its limit's in the same round."""
        return [run.throughput / base for run, base in zip(self.runs[name, 32], limit, strict=True)]

    def checks(self) -> list[tuple[str, float, str, bool]]:
        """(what, measured, target, met) for every target."""
        debit = statistics.median(self.ratios("DebitCredits", [r.tps for r in self.pgbench]))
        echo = [r.throughput for r in self.runs[ECHO, 32]]
        balance = statistics.median(self.ratios("GetBalance", echo))
        found = [
            (
                "DebitCredits c32 / pgbench 8 clients",
                debit,
                f">= {DEBIT_VS_PGBENCH}",
                debit >= DEBIT_VS_PGBENCH,
            ),
            (
                "GetBalance / echo, c32",
                balance,
                f">= {BALANCE_VS_ECHO}",
                balance >= BALANCE_VS_ECHO,
            ),
        ]
        if (DEBIT_FIVE_GRANTS, 32) in self.runs:
            plain = [r.throughput for r in self.runs["DebitCredits", 32]]
            five = statistics.median(self.ratios(DEBIT_FIVE_GRANTS, plain))
            found.append(
                (
                    "DebitCredits 5 grants / 1 grant, c32",
                    five,
                    f">= {FIVE_GRANTS_VS_DEBIT}",
                    five >= FIVE_GRANTS_VS_DEBIT,
                )
            )
        if (HTTP_ECHO, 32) in self.runs:
            floor = [r.throughput for r in self.runs[HTTP_ECHO, 32]]
            for name in (CONNECT_BALANCE, CONNECT_DEBIT):
                ratio = statistics.median(self.ratios(name, floor))
                found.append(
                    (
                        f"{name} / ASGI echo, c32",
                        ratio,
                        f">= {CONNECT_VS_HTTP_ECHO}",
                        ratio >= CONNECT_VS_HTTP_ECHO,
                    )
                )
        for (name, concurrency), results in self.runs.items():
            if concurrency == 32 and name not in (ECHO, ECHO_SELECT, ECHO_DEBIT, HTTP_ECHO):
                p99 = merged(results).percentile(0.99)
                found.append(
                    (f"{name} p99 at c32 (ms)", p99, f"< {P99_MS_AT_32:g}", p99 < P99_MS_AT_32)
                )
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
        tps = [r.tps for r in self.pgbench]
        lines = [
            f"machine: {self.machine}",
            f"server processes: {self.processes}; load generator processes: "
            f"{self.load_processes}; rounds: {len(self.pgbench)}",
            "",
            "| run | concurrency | calls/s | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|",
            f"| pgbench credit_debit | 8 | {statistics.median(tps):,.0f} | | | |",
        ]
        for (name, concurrency), results in sorted(self.runs.items()):
            result = merged(results)
            lines.append(
                f"| {name} | {concurrency} | {result.throughput:,.0f} | "
                f"{result.percentile(0.5):.2f} | {result.percentile(0.99):.2f} | {result.errors} |"
            )
        lines += ["", "| target | measured | wanted | met |", "|---|---:|---:|---|"]
        for what, value, wanted, met in self.checks():
            lines.append(f"| {what} | {value:.2f} | {wanted} | {'yes' if met else 'NO'} |")
        debit = ", ".join(f"{r:.2f}" for r in self.ratios("DebitCredits", tps))
        echo = [r.throughput for r in self.runs[ECHO, 32]]
        balance = ", ".join(f"{r:.2f}" for r in self.ratios("GetBalance", echo))
        lines += ["", f"per round: DebitCredits/pgbench {debit}; GetBalance/echo {balance}"]
        if (DEBIT_FIVE_GRANTS, 32) in self.runs:
            plain = [r.throughput for r in self.runs["DebitCredits", 32]]
            five = ", ".join(f"{r:.2f}" for r in self.ratios(DEBIT_FIVE_GRANTS, plain))
            lines[-1] += f"; DebitCredits 5 grants/1 grant {five}"
        if (HTTP_ECHO, 32) in self.runs:
            floor = [r.throughput for r in self.runs[HTTP_ECHO, 32]]
            over = {
                name: ", ".join(f"{r:.2f}" for r in self.ratios(name, floor))
                for name in (CONNECT_BALANCE, CONNECT_DEBIT)
            }
            lines.append(
                f"per round over Connect: GetBalance/ASGI echo {over[CONNECT_BALANCE]}; "
                f"DebitCredits/ASGI echo {over[CONNECT_DEBIT]}"
            )
        select, bare_debit = (
            merged(self.runs[name, 32]).throughput for name in (ECHO_SELECT, ECHO_DEBIT)
        )
        lines.append(
            f"floors: echo + select 1 / echo {select / statistics.median(echo):.2f}; "
            f"echo + credit_debit / pgbench {bare_debit / statistics.median(tps):.2f}"
        )
        if self.webhook_events_per_second is not None:
            lines.append(f"webhook deliveries: {self.webhook_events_per_second:,.0f} events/s")
        return "\n".join(lines)
