"""CPU per call in the bench: a process tree's CPU seconds read from /proc count its children,
the live ones and the ones that exited meanwhile; rows merge their rounds' CPU, and the table
shows it per call beside calls/s, for the server and the database apart."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.cpu import Usage, Watch
from bench.loadgen import Result
from bench.pgbench import PgbenchResult
from bench.report import ECHO, ECHO_DEBIT, ECHO_SELECT, Report, cpu_cells, merged

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass"


def test_a_tree_counts_its_childrens_cpu_whether_they_run_or_have_exited() -> None:
    # A parent that starts a child burning 0.3 s of CPU, waits for it, then sleeps: by the
    # second reading the child has exited and been reaped, its time now in the parent's.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"subprocess.run([sys.executable, '-c', {BURN.format(seconds=0.3)!r}])\n"
            "time.sleep(30)",
        ]
    )
    try:
        watch = Watch((parent.pid,), (os.getpid(),))
        before = watch.read()
        deadline = time.monotonic() + 20
        while watch.read().server - before.server < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        spent = watch.read() - before
        assert 0.3 <= spent.server < 2.0
        assert spent.database >= 0  # this process, which only sleeps and reads /proc
    finally:
        parent.kill()
        parent.wait()


def test_rows_merge_their_rounds_cpu_and_show_it_per_call() -> None:
    rounds = [
        Result(100, 0, 1.0, [1.0] * 100, Usage(0.02, 0.01)),
        Result(300, 0, 1.0, [1.0] * 300, Usage(0.06, 0.03)),
    ]
    row = merged(rounds)
    assert row.cpu_per_call() == Usage(0.0002, 0.0001)
    assert cpu_cells(row.cpu_per_call()) == "300 | 200 | 100"
    # A round measured without watching leaves the row's CPU unknown, not undercounted.
    assert merged([*rounds, Result(10, 0, 1.0, [1.0] * 10)]).cpu_per_call() is None
    assert cpu_cells(None) == " | | "


def test_the_table_has_cpu_per_call_beside_calls_per_second() -> None:
    found = Report("test machine", 1, 2, cold_start=1.0)
    found.pgbench = [PgbenchResult(1000.0, 1.0, Usage(0.0, 0.0004))]
    for name in ("DebitCredits", "GetBalance", ECHO, ECHO_SELECT, ECHO_DEBIT):
        found.add(name, 32, Result(500, 0, 1.0, [1.0] * 500, Usage(0.1, 0.05)))
    lines = found.render().splitlines()
    header = next(line for line in lines if line.startswith("| run |"))
    assert header.split(" | ")[2:6] == ["calls/s", "CPU µs/call", "server", "database"]
    row = next(line for line in lines if line.startswith("| GetBalance | 32"))
    assert "| 500 | 300 | 200 | 100 |" in row
    pgbench = next(line for line in lines if line.startswith("| pgbench"))
    assert "| 1,000 | 400 | 0 | 400 |" in pgbench
