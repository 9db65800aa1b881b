"""The benchmark's one table: every run, then the ratios against their targets."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.loadgen import Result
from bench.pgbench import PgbenchResult

DEBIT_VS_PGBENCH = 0.35
BALANCE_VS_ECHO = 0.6
P99_MS_AT_32 = 10.0
COLD_START_SECONDS = 5.0


@dataclass(slots=True)
class Row:
    scenario: str
    concurrency: int
    result: Result


@dataclass
class Report:
    machine: str
    processes: int
    load_processes: int
    cold_start: float = float("nan")
    pgbench: PgbenchResult | None = None
    echo: dict[int, Result] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def _service(self, scenario: str, concurrency: int) -> Result:
        return next(
            row.result
            for row in self.rows
            if row.scenario == scenario and row.concurrency == concurrency
        )

    def checks(self) -> list[tuple[str, float, str, bool]]:
        """(what, measured, target, met) for every target."""
        assert self.pgbench is not None
        debit = self._service("DebitCredits", 32).throughput / self.pgbench.tps
        balance = self._service("GetBalance", 32).throughput / self.echo[32].throughput
        found = [
            (
                "DebitCredits / pgbench (c32 vs 8 clients)",
                debit,
                f">= {DEBIT_VS_PGBENCH}",
                debit >= DEBIT_VS_PGBENCH,
            ),
            (
                "GetBalance / echo (c32)",
                balance,
                f">= {BALANCE_VS_ECHO}",
                balance >= BALANCE_VS_ECHO,
            ),
        ]
        for row in self.rows:
            if row.concurrency == 32:
                p99 = row.result.percentile(0.99)
                found.append(
                    (
                        f"{row.scenario} p99 at c32 (ms)",
                        p99,
                        f"< {P99_MS_AT_32:g}",
                        p99 < P99_MS_AT_32,
                    )
                )
        found.append(
            (
                "cold start (s)",
                self.cold_start,
                f"< {COLD_START_SECONDS:g}",
                self.cold_start < COLD_START_SECONDS,
            )
        )
        return found

    def all_met(self) -> bool:
        return all(met for *_, met in self.checks())

    def render(self) -> str:
        assert self.pgbench is not None
        lines = [
            f"machine: {self.machine}",
            f"server processes: {self.processes}; load generator processes: {self.load_processes}",
            "",
            "| run | concurrency | calls/s | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|",
            f"| pgbench credit_debit | 8 | {self.pgbench.tps:,.0f} | | "
            f"| (mean {self.pgbench.latency_ms:.2f}) |",
        ]
        measured = [("echo GetBalance", c, r) for c, r in sorted(self.echo.items())]
        measured += [(row.scenario, row.concurrency, row.result) for row in self.rows]
        for name, concurrency, result in measured:
            lines.append(
                f"| {name} | {concurrency} | {result.throughput:,.0f} | "
                f"{result.percentile(0.5):.2f} | {result.percentile(0.99):.2f} | {result.errors} |"
            )
        lines += ["", "| target | measured | wanted | met |", "|---|---:|---:|---|"]
        for what, value, wanted, met in self.checks():
            lines.append(f"| {what} | {value:.2f} | {wanted} | {'yes' if met else 'NO'} |")
        return "\n".join(lines)
