"""The benchmark's arithmetic: percentiles, runs merged over rounds, ratios paired by round, and
targets judged on them (the numbers themselves come from `make bench`, never from tests)."""

from __future__ import annotations

import pytest

from bench.loadgen import Result
from bench.pgbench import PgbenchResult
from bench.queue import Drained, Waits
from bench.report import ECHO, ECHO_DEBIT, ECHO_SELECT, Report, merged
from bench.scenarios import DEBIT_FIVE_GRANTS, HOT_ACCOUNT


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


def report(
    balance: list[int],
    select: list[int],
    debit: list[int],
    debit_floor: list[int],
    latency: float = 5.0,
) -> Report:
    """Rounds of GetBalance and DebitCredits beside their floors (all at `latency` ms but the
    floors, at 5 ms), a hot account beside pgbench's one user, and a cold start of 1.5 s."""
    found = Report("test machine", 1, 2, cold_start=1.5)
    found.pgbench = [PgbenchResult(1000.0, 1.0) for _ in balance]
    found.pgbench_hot = [PgbenchResult(300.0, 1.0) for _ in balance]
    for name, rounds, ms in (
        ("GetBalance", balance, latency),
        (ECHO_SELECT, select, 5.0),
        ("DebitCredits", debit, latency),
        (ECHO_DEBIT, debit_floor, 5.0),
        (HOT_ACCOUNT, [300] * len(balance), latency),
        (ECHO, [2000] * len(balance), 1.0),
    ):
        for calls in rounds:
            found.add(name, 32, result(calls, [ms] * calls))
    return found


BALANCE = "GetBalance / echo + asyncpg select 1, c32"
DEBIT = "DebitCredits / echo + asyncpg credit_debit, c32"


def test_ratios_pair_each_round_with_its_own_floor() -> None:
    # A slow second round slows the floor and the service alike: its ratio is unchanged.
    found = report([800, 400, 800], [1000, 500, 1000], [500, 250, 500], [500, 250, 500])
    assert found.per_round("GetBalance", ECHO_SELECT) == [0.8, 0.8, 0.8]
    checks = {what: (value, met) for what, value, _, met in found.checks()}
    assert checks[BALANCE] == (0.8, True)
    assert checks[DEBIT] == (1.0, True)
    assert checks["GetBalance p99 / echo + asyncpg select 1 p99, c32"] == (1.0, True)
    assert checks[f"{HOT_ACCOUNT} c32 / pgbench one user"] == (1.0, True)
    assert checks["cold start to SERVING (s)"] == (1.5, True)
    assert found.all_met()
    assert "- GetBalance / echo + asyncpg select 1: 0.80, 0.80, 0.80" in found.render()


@pytest.mark.parametrize(
    ("balance", "debit", "latency", "missed"),
    [
        (700, 500, 5.0, [BALANCE]),
        (800, 450, 5.0, [DEBIT]),
        (
            800,
            500,
            8.0,
            [
                "GetBalance p99 / echo + asyncpg select 1 p99, c32",
                "DebitCredits p99 / echo + asyncpg credit_debit p99, c32",
            ],
        ),
    ],
)
def test_a_missed_target_fails_the_run(
    balance: int, debit: int, latency: float, missed: list[str]
) -> None:
    found = report([balance], [1000], [debit], [500], latency)
    failed = [what for what, _, _, met in found.checks() if not met]
    assert failed == missed
    assert not found.all_met()
    assert "| NO |" in found.render()


def test_the_tail_is_shown_as_p99_over_the_mean_beside_the_floor_s() -> None:
    found = report([100, 100], [100, 100], [100, 100], [100, 100])
    found.runs["GetBalance", 32] = [
        result(100, [4.0] * 98 + [8.0, 8.0]),  # p99 8 ms, mean 4.08 ms
        result(100, [2.0] * 99 + [10.0]),  # p99 10 ms, mean 2.08 ms
    ]
    assert found.tails_per_round("GetBalance") == pytest.approx([8 / 4.08, 10 / 2.08])
    assert f"- GetBalance p99 / its mean: 1.96, 4.81; {ECHO_SELECT}'s: 1.00, 1.00" in (
        found.render()
    )


def test_a_hot_account_below_pgbench_on_its_row_and_a_slow_cold_start_fail() -> None:
    found = report([800], [1000], [500], [500])
    found.runs[HOT_ACCOUNT, 32] = [result(150, [5.0] * 150)]
    found.cold_start = 2.5
    failed = [what for what, _, _, met in found.checks() if not met]
    assert failed == [f"{HOT_ACCOUNT} c32 / pgbench one user", "cold start to SERVING (s)"]


@pytest.mark.parametrize(("five", "met"), [(460, True), (440, False)])
def test_debits_of_users_with_five_grants_are_held_within_10_percent_of_plain_ones(
    five: int, met: bool
) -> None:
    found = report([800], [1000], [500], [500])
    what = f"{DEBIT_FIVE_GRANTS} / DebitCredits, c32"
    assert what not in {what for what, *_ in found.checks()}
    found.add(DEBIT_FIVE_GRANTS, 32, result(five, [5.0] * five))
    checks = {what: (value, ok) for what, value, _, ok in found.checks()}
    assert checks[what] == (five / 500, met)
    assert f"- {DEBIT_FIVE_GRANTS} / DebitCredits: {five / 500:.2f}" in found.render()


@pytest.mark.parametrize(("per_second", "met"), [(250.0, True), (150.0, False)])
def test_the_generation_queue_keeps_up_with_half_of_create_generation(
    per_second: float, met: bool
) -> None:
    found = report([800], [1000], [500], [500])
    found.add("CreateGeneration", 32, result(400, [5.0] * 400))
    found.queue_drained = Drained(succeeded=1200, others=0, per_second=per_second)
    found.queue_waits = Waits(rate=200.0, waits_ms=[float(n) for n in range(1, 101)])
    checks = {what: (value, ok) for what, value, _, ok in found.checks()}
    assert checks["generations create to SUCCEEDED / CreateGeneration, c32"] == (
        per_second / 400,
        met,
    )
    shown = found.render()
    assert "1,200 SUCCEEDED (0 did not)" in shown
    assert (
        "created at 200 a second (half CreateGeneration's rate): p50 51.0 ms, p99 100.0 ms" in shown
    )
