"""`credits serve` with CREDITS_PROCESSES=2: two server processes on one port, a supervisor that
restarts a killed one and stops them all (and the embedded PostgreSQL) on SIGTERM, and children
that do not outlive a SIGKILLed supervisor. Processes are told apart by the `pid` field of the
JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from credits.v1 import credit_service_pb2, credit_service_pb2_grpc
from server.processes import MAX_CRASHES
from tests.fixtures.process import (
    START_TIMEOUT,
    ServeProcess,
    health_status,
    launch_serve,
    pid_alive,
    scratch_dir,
    start_serve,
    wait_gone,
)

pytestmark = pytest.mark.timeout(180)

PROCESSES = {"CREDITS_PROCESSES": "2"}
RPC_TIMEOUT = 10.0
EXIT_TIMEOUT = 20.0
CONNECTIONS = 40


def log_lines(proc: ServeProcess) -> list[dict[str, Any]]:
    """The server's JSON log lines so far."""
    lines = []
    for text in proc.log().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def eventually(check: Callable[[], bool], timeout: float, what: str, proc: ServeProcess) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}\n{proc.describe()}"
        time.sleep(0.1)


def child_pids(proc: ServeProcess) -> dict[int, int]:
    """The latest pid of each child, from the supervisor's "process i ready" lines."""
    pids: dict[int, int] = {}
    for line in log_lines(proc):
        message = str(line["message"])
        if "child_pid" in line and message.startswith("process ") and "ready" in message:
            pids[int(line["process"])] = int(line["child_pid"])
    return pids


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def balance_on_fresh_connections(proc: ServeProcess, token: str, tag: str) -> set[int]:
    """GetBalance on CONNECTIONS new channels (each its own TCP connection); the pids whose
    access log lines answered them."""
    ids = [f"{tag}-{i}" for i in range(CONNECTIONS)]
    for request_id in ids:
        with grpc.insecure_channel(proc.address) as channel:
            credit_service_pb2_grpc.CreditServiceStub(channel).GetBalance(
                credit_service_pb2.GetBalanceRequest(),
                metadata=(*bearer(token), ("x-request-id", request_id)),
                timeout=RPC_TIMEOUT,
            )

    def answered() -> dict[str, int]:
        return {
            str(line["request_id"]): int(line["pid"])
            for line in log_lines(proc)
            if line.get("request_id") in ids
        }

    eventually(lambda: len(answered()) == len(ids), 10.0, "every call in the access log", proc)
    return set(answered().values())


@pytest.fixture(scope="module")
def served() -> Iterator[ServeProcess]:
    with scratch_dir("credits-e2e-processes-") as workdir:
        proc = start_serve(workdir, extra_env=PROCESSES)
        try:
            eventually(lambda: len(child_pids(proc)) == 2, 10.0, "both children ready", proc)
            yield proc
        finally:
            proc.stop()


@pytest.fixture(scope="module")
def token(served: ServeProcess) -> str:
    return served.token("--user", "7d2f6a1e-3c4b-4e5d-8f90-a1b2c3d4e5f6")


def test_two_processes_share_the_port_and_its_connections(served: ServeProcess, token: str) -> None:
    children = child_pids(served)
    assert len(set(children.values())) == 2
    assert served.popen.pid not in children.values()
    serving = [
        line for line in log_lines(served) if str(line["message"]).startswith("credits serving on")
    ]
    assert len(serving) == 1, served.describe()
    assert f"on {served.address} (" in serving[0]["message"]
    assert "2 processes" in serving[0]["message"]
    assert serving[0]["pid"] == served.popen.pid

    pids = balance_on_fresh_connections(served, token, "spread")
    assert pids == set(children.values()), served.describe()


def test_a_killed_child_is_restarted_and_the_service_keeps_answering(
    served: ServeProcess, token: str
) -> None:
    before = child_pids(served)
    victim = before[1]
    os.kill(victim, signal.SIGKILL)
    # Not wait_gone(): the main thread turns zombie while the others still hold the listening
    # socket (connections queued there then are reset). The supervisor's line comes once the
    # whole process is gone.
    eventually(
        lambda: any(
            f"(pid {victim}) exited with -9: restarting" in str(line["message"])
            for line in log_lines(served)
        ),
        10.0,
        "the supervisor saw the kill",
        served,
    )
    # Every call is answered meanwhile: by the other process (or by 1's successor, if quick).
    meanwhile = balance_on_fresh_connections(served, token, "meanwhile")
    assert victim not in meanwhile
    assert meanwhile <= {before[0], *child_pids(served).values()}
    eventually(
        lambda: child_pids(served).get(1) not in (None, victim), 20.0, "process 1 restarted", served
    )
    after = child_pids(served)
    assert after[0] == before[0]
    assert pid_alive(after[1])
    assert balance_on_fresh_connections(served, token, "after") == set(after.values())


def test_sigterm_stops_every_child_then_the_database(served: ServeProcess) -> None:
    children = list(child_pids(served).values())
    postmaster = served.read_postmaster_pid()
    served.send_signal(signal.SIGTERM)
    try:
        code = served.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {EXIT_TIMEOUT} s after SIGTERM\n{served.describe()}")
    assert code == 0, served.describe()
    for pid in children:
        assert not pid_alive(pid), f"child {pid} outlived the supervisor"
    assert wait_gone(postmaster, 5.0), f"PostgreSQL (pid {postmaster}) still running"
    assert not served.postmaster_pid_file.exists()
    lines = log_lines(served)
    assert {line["pid"] for line in lines if line["message"] == "stopped"} == {
        served.popen.pid,
        *children,
    }
    assert lines[-1]["message"] == "stopped"
    assert lines[-1]["pid"] == served.popen.pid


def _start_on_port_zero(workdir: Path) -> ServeProcess:
    """`credits serve` on 127.0.0.1:0 with two processes and metrics on port 0: the port comes
    from its log line."""
    extra = {**PROCESSES, "CREDITS_METRICS_LISTEN": "127.0.0.1:0"}
    proc = launch_serve(workdir, workdir / ".data", 0, extra)
    try:
        eventually(
            lambda: any(
                str(line["message"]).startswith("credits serving on 127.0.0.1:")
                for line in log_lines(proc)
            ),
            START_TIMEOUT,
            "the serving line",
            proc,
        )
        [line] = [
            line
            for line in log_lines(proc)
            if str(line["message"]).startswith("credits serving on")
        ]
        proc.port = int(line["message"].split()[3].rsplit(":", 1)[1])
        assert proc.port > 0
        proc.postmaster_pid = proc.read_postmaster_pid()
    except BaseException:
        proc.kill()
        raise
    return proc


def test_port_zero_is_one_port_and_children_stop_when_the_supervisor_is_killed() -> None:
    with scratch_dir("credits-e2e-processes-kill-") as workdir:
        proc = _start_on_port_zero(workdir)
        try:
            assert health_status(proc.address) == health_pb2.HealthCheckResponse.SERVING
            children = list(child_pids(proc).values())
            assert len(children) == 2

            def serving() -> dict[int, str]:
                return {
                    line["pid"]: str(line["message"])
                    for line in log_lines(proc)
                    if str(line["message"]).startswith("credits process ")
                    and f"serving on port {proc.port}," in str(line["message"])
                }

            # A child logs its line just after telling the supervisor it is ready.
            eventually(
                lambda: set(serving()) == set(children), 5.0, "each child's serving line", proc
            )
            metrics_ports = {int(message.rsplit(" ", 1)[1]) for message in serving().values()}
            # Each child picked a metrics port of its own, and serves it.
            assert len(metrics_ports) == 2
            for port in metrics_ports:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                    assert b"credits_rpcs_total" in page.read()

            proc.popen.kill()
            proc.popen.wait(timeout=EXIT_TIMEOUT)
            for pid in children:
                assert wait_gone(pid, EXIT_TIMEOUT), f"child {pid} still running\n{proc.describe()}"
            assert any("is gone: stopping" in str(line["message"]) for line in log_lines(proc)), (
                proc.describe()
            )
        finally:
            proc.kill()


def test_a_child_that_keeps_crashing_stops_everything_with_exit_1() -> None:
    with scratch_dir("credits-e2e-processes-crash-") as workdir:
        proc = start_serve(workdir, extra_env=PROCESSES)
        try:
            eventually(lambda: len(child_pids(proc)) == 2, 10.0, "both children ready", proc)
            survivor = child_pids(proc)[0]
            postmaster = proc.read_postmaster_pid()
            killed: list[int] = []
            while proc.popen.poll() is None and len(killed) < MAX_CRASHES:
                eventually(
                    lambda: child_pids(proc).get(1) not in killed or proc.popen.poll() is not None,
                    20.0,
                    "process 1 back",
                    proc,
                )
                victim = child_pids(proc)[1]
                if victim not in killed:
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
            code = proc.wait(timeout=EXIT_TIMEOUT)
            assert code == 1, proc.describe()
            assert len(killed) == MAX_CRASHES
            assert any("giving up" in str(line["message"]) for line in log_lines(proc))
            assert wait_gone(survivor, 5.0), f"process 0 ({survivor}) outlived the supervisor"
            assert wait_gone(postmaster, 5.0), f"PostgreSQL (pid {postmaster}) still running"
        finally:
            proc.kill()


def test_a_killed_postgres_is_started_again_by_the_supervisor() -> None:
    with scratch_dir("credits-e2e-processes-postgres-") as workdir:
        proc = start_serve(workdir, extra_env=PROCESSES)
        try:
            eventually(lambda: len(child_pids(proc)) == 2, 10.0, "both children ready", proc)
            token = proc.token("--user", "5c1e2d3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f")
            assert balance_on_fresh_connections(proc, token, "before")
            children = child_pids(proc)
            killed = proc.read_postmaster_pid()
            os.kill(killed, signal.SIGKILL)
            assert wait_gone(killed, EXIT_TIMEOUT)

            def answers() -> bool:
                try:
                    balance_on_fresh_connections(proc, token, f"after-{time.monotonic()}")
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    return False
                return True

            eventually(answers, 30.0, "every process answers again", proc)
            assert proc.read_postmaster_pid() != killed
            assert child_pids(proc) == children, "no process was restarted"
            assert any(
                line["pid"] == proc.popen.pid and "started again" in str(line["message"])
                for line in log_lines(proc)
            ), proc.describe()
        finally:
            proc.stop()
        assert proc.popen.returncode == 0, proc.describe()
