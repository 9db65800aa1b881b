"""The benchmark's Connect rows: GetBalance and DebitCredits over Connect judged against the bare
ASGI echo of the same round, the echo itself held to no latency target."""

from __future__ import annotations

from bench.loadgen import Result
from bench.pgbench import PgbenchResult
from bench.report import (
    CONNECT_BALANCE,
    CONNECT_DEBIT,
    ECHO,
    ECHO_DEBIT,
    ECHO_SELECT,
    HTTP_ECHO,
    Report,
)


def result(calls: int, latency_ms: float = 5.0) -> Result:
    return Result(calls=calls, errors=0, seconds=1.0, latencies_ms=[latency_ms] * calls)


def report(balance: list[int], debit: list[int], floor: list[int]) -> Report:
    found = Report("test machine", 1, 2, cold_start=2.0)
    found.pgbench = [PgbenchResult(1000, 1.0) for _ in floor]
    for name, rounds in (
        ("DebitCredits", [400] * len(floor)),
        ("GetBalance", [600] * len(floor)),
        (ECHO, [1000] * len(floor)),
        (CONNECT_BALANCE, balance),
        (CONNECT_DEBIT, debit),
    ):
        for calls in rounds:
            found.add(name, 32, result(calls))
    for calls in floor:
        found.add(HTTP_ECHO, 32, result(calls, latency_ms=50.0))
    for name in (ECHO_SELECT, ECHO_DEBIT):
        found.add(name, 32, result(10))
    return found


def test_connect_runs_are_judged_against_the_asgi_echo_of_their_round() -> None:
    # A slow second round slows the floor and the service alike: its ratio is unchanged.
    found = report([700, 350], [600, 300], [1000, 500])
    checks = {what: (value, met) for what, value, _, met in found.checks()}
    assert checks[f"{CONNECT_BALANCE} / {HTTP_ECHO}, c32"] == (0.7, True)
    assert checks[f"{CONNECT_DEBIT} / {HTTP_ECHO}, c32"] == (0.6, True)
    assert not any(what.startswith(f"{HTTP_ECHO} p99") for what in checks)  # a floor
    assert all(met for what, (_, met) in checks.items() if "Connect" in what)
    assert f"- {CONNECT_BALANCE} / {HTTP_ECHO}: 0.70, 0.70" in found.render()


def test_connect_below_its_target_is_not_met() -> None:
    found = report([500, 500], [100, 100], [1000, 1000])
    checks = {what: met for what, _, _, met in found.checks()}
    assert checks[f"{CONNECT_BALANCE} / {HTTP_ECHO}, c32"] is False
    assert not found.all_met()
