"""The benchmark's arithmetic: percentiles, runs merged over rounds, ratios paired by round, and
targets judged on them (the numbers themselves come from `make bench`, never from tests)."""

from __future__ import annotations

import pytest

from bench.loadgen import Result
from bench.pgbench import PgbenchResult
from bench.report import ECHO, ECHO_DEBIT, ECHO_SELECT, Report, merged
from bench.scenarios import DEBIT_FIVE_GRANTS


def result(calls: int, latencies: list[float], seconds: float = 1.0) -> Result:
    return Result(calls=calls, errors=0, seconds=seconds, latencies_ms=latencies)


def test_percentiles_are_read_off_the_sorted_latencies() -> None:
    run = result(100, [float(n) for n in range(100, 0, -1)])
    assert (run.percentile(0.5), run.percentile(0.99), run.percentile(1.0)) == (51.0, 100.0, 100.0)
    assert run.throughput == 100


def test_rounds_merge_into_calls_over_all_their_seconds() -> None:
    run = merged([result(100, [1.0] * 100), result(300, [3.0] * 300)])
    assert run.throughput == 200
    assert run.percentile(0.5) == 3.0


def report(debit: list[int], pgbench: list[float], balance: list[int], echo: list[int]) -> Report:
    found = Report("test machine", 1, 2, cold_start=2.0)
    found.pgbench = [PgbenchResult(tps, 1.0) for tps in pgbench]
    for name, rounds in (("DebitCredits", debit), ("GetBalance", balance), (ECHO, echo)):
        for calls in rounds:
            found.add(name, 32, result(calls, [5.0] * calls))
    for name in (ECHO_SELECT, ECHO_DEBIT):
        found.add(name, 32, result(10, [1.0] * 10))
    return found


def test_ratios_pair_each_round_with_its_own_limit() -> None:
    # A slow second round slows the limit and the service alike: its ratio is unchanged.
    found = report([400, 200, 400], [1000, 500, 1000], [600, 300, 600], [1000, 500, 1000])
    assert found.ratios("DebitCredits", [r.tps for r in found.pgbench]) == [0.4, 0.4, 0.4]
    checks = {what: (value, met) for what, value, _, met in found.checks()}
    assert checks["DebitCredits c32 / pgbench 8 clients"] == (0.4, True)
    assert checks["GetBalance / echo, c32"] == (0.6, True)
    assert checks["cold start to SERVING (s)"] == (2.0, True)
    assert found.all_met()


@pytest.mark.parametrize(
    ("debit", "balance", "latency", "missed"),
    [
        (300, 600, 5.0, "DebitCredits c32 / pgbench 8 clients"),
        (400, 500, 5.0, "GetBalance / echo, c32"),
        (400, 600, 12.0, "GetBalance p99 at c32 (ms)"),
    ],
)
def test_a_missed_target_fails_the_run(
    debit: int, balance: int, latency: float, missed: str
) -> None:
    found = report([debit], [1000], [balance], [1000])
    found.runs["GetBalance", 32] = [result(balance, [latency] * balance)]
    failed = [what for what, _, _, met in found.checks() if not met]
    assert failed == [missed]
    assert not found.all_met()
    assert "| NO |" in found.render()


@pytest.mark.parametrize(("five", "met"), [(360, True), (340, False)])
def test_debits_of_users_with_five_grants_are_held_within_10_percent_of_plain_ones(
    five: int, met: bool
) -> None:
    found = report([400], [1000], [600], [1000])
    assert "DebitCredits 5 grants / 1 grant, c32" not in {what for what, *_ in found.checks()}
    found.add(DEBIT_FIVE_GRANTS, 32, result(five, [5.0] * five))
    checks = {what: (value, ok) for what, value, _, ok in found.checks()}
    assert checks["DebitCredits 5 grants / 1 grant, c32"] == (five / 400, met)
    assert f"DebitCredits 5 grants/1 grant {five / 400:.2f}" in found.render()
