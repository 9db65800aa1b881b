"""`credits serve` stopped the hard and the gentle way while it works: the ledger stays
consistent, and a graceful stop lets in-flight RPCs finish. Its embedded PostgreSQL killed
under it is started again, and one left behind by a killed service is stopped by the next."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2

from credits.v1 import credit_service_pb2 as cpb
from credits.v1 import credit_service_pb2_grpc, generation_pb2, generation_service_pb2_grpc
from credits.v1 import generation_service_pb2 as gpb
from tests.fixtures.process import (
    ServeProcess,
    free_port,
    health_status,
    pid_alive,
    scratch_dir,
    start_serve,
    wait_gone,
)

USER = "3d6c0a51-4b7e-4f2a-9c1d-8e5f6a7b8c9d"


@pytest.fixture
def workdir() -> Iterator[Path]:
    with scratch_dir("credits-e2e-faults-") as folder:
        yield folder


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def fund(proc: ServeProcess, amount: int) -> tuple[tuple[str, str]]:
    """The user's metadata, after their profile exists with `amount` credits."""
    user = bearer(proc.token("--user", USER))
    with grpc.insecure_channel(proc.address) as channel:
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        stub.GetBalance(cpb.GetBalanceRequest(), metadata=user, timeout=10)
        stub.GrantCredits(
            cpb.GrantCreditsRequest(user_id=USER, amount=amount, idempotency_key="seed"),
            metadata=bearer(proc.token("--service")),
            timeout=10,
        )
    return user


def test_a_server_killed_under_load_leaves_a_consistent_ledger(workdir: Path) -> None:
    proc = start_serve(workdir)
    try:
        user = fund(proc, 1000)
        keys = [f"order-{i}" for i in range(200)]
        answered: set[str] = set()
        lock = threading.Lock()

        def debit(key: str) -> None:
            with grpc.insecure_channel(proc.address) as channel:
                stub = credit_service_pb2_grpc.CreditServiceStub(channel)
                try:
                    stub.DebitCredits(
                        cpb.DebitCreditsRequest(amount=1, idempotency_key=key),
                        metadata=user,
                        timeout=10,
                    )
                except grpc.RpcError:
                    return  # the server died under this call
                with lock:
                    answered.add(key)
                    if len(answered) == 30:  # well into the load: kill it now
                        proc.kill()

        with ThreadPoolExecutor(max_workers=8) as pool:
            for key in keys:
                pool.submit(debit, key)
    finally:
        proc.kill()

    # The same data dir again: what was answered is there once; retrying every key with the
    # same idempotency key completes the rest, and nothing is charged twice.
    again = start_serve(workdir)
    try:
        with grpc.insecure_channel(again.address) as channel:
            stub = credit_service_pb2_grpc.CreditServiceStub(channel)
            for key in keys:
                reply = stub.DebitCredits(
                    cpb.DebitCreditsRequest(amount=1, idempotency_key=key),
                    metadata=user,
                    timeout=10,
                )
                assert reply.replayed or key not in answered, f"{key} was charged twice"
            balance = stub.GetBalance(cpb.GetBalanceRequest(), metadata=user, timeout=10)
            ledger = ledger_of(stub, user)
    finally:
        again.stop()
    assert 0 < len(answered) < len(keys), "the kill landed in the middle of the load"
    assert balance.balance == 1000 - len(keys)
    debits = [t for t in ledger if t.idempotency_key.startswith("order-")]
    assert sorted(t.idempotency_key for t in debits) == sorted(keys)
    assert balance.balance == sum(
        t.amount if t.kind == 2 else -t.amount
        for t in ledger  # 2: TRANSACTION_KIND_GRANT
    )


def ledger_of(
    stub: credit_service_pb2_grpc.CreditServiceStub, user: tuple[tuple[str, str]]
) -> list[object]:
    rows: list[object] = []
    token = ""
    while True:
        page = stub.ListTransactions(
            cpb.ListTransactionsRequest(page_size=500, page_token=token), metadata=user
        )
        rows += list(page.transactions)
        token = page.next_page_token
        if not token:
            return rows


def test_sigterm_lets_an_in_flight_generation_finish(workdir: Path) -> None:
    """SIGTERM ends the watch at once (SERVER_STOPPING), and the worker still finishes the job
    it holds within the grace period: a restart finds it SUCCEEDED and charged."""
    proc = start_serve(workdir)
    try:
        user = fund(proc, 100)
        with grpc.insecure_channel(proc.address) as channel:
            generations = generation_service_pb2_grpc.GenerationServiceStub(channel)
            created = generations.CreateGeneration(
                gpb.CreateGenerationRequest(
                    model="demo-image",
                    prompt="a lighthouse",
                    parameters={"delay_ms": "1500"},
                    request_id=uuid.uuid4().hex,
                ),
                metadata=user,
                timeout=10,
            ).generation
            watch = generations.WatchGeneration(
                gpb.WatchGenerationRequest(generation_id=created.generation_id),
                metadata=user,
                timeout=15,
            )
            running = next(
                m for m in watch if m.generation.state != generation_pb2.GENERATION_STATE_QUEUED
            )
            assert running.generation.state == generation_pb2.GENERATION_STATE_RUNNING
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as ended:
                list(watch)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(timeout=15) == 0
    finally:
        proc.stop()
    again = start_serve(workdir)
    try:
        with grpc.insecure_channel(again.address) as channel:
            generations = generation_service_pb2_grpc.GenerationServiceStub(channel)
            finished = generations.GetGeneration(
                gpb.GetGenerationRequest(generation_id=created.generation_id),
                metadata=user,
                timeout=10,
            ).generation
        assert finished.state == generation_pb2.GENERATION_STATE_SUCCEEDED
        assert finished.attempts == 1  # finished by the first worker, not taken over
        assert balance(again, user) == 100 - created.cost
    finally:
        again.stop()


def balance(proc: ServeProcess, user: tuple[tuple[str, str]]) -> int:
    with grpc.insecure_channel(proc.address) as channel:
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        reply = stub.GetBalance(cpb.GetBalanceRequest(), metadata=user, timeout=10)
    return int(reply.balance)


def answered(proc: ServeProcess, user: tuple[tuple[str, str]]) -> int | None:
    """The user's balance, or None while the service says UNAVAILABLE (and nothing else)."""
    try:
        return balance(proc, user)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None


def metric(port: int, name: str) -> float | None:
    """A sample of this service's /metrics, by its full name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def test_a_killed_postgres_is_started_again_and_calls_succeed_without_a_restart(
    workdir: Path,
) -> None:
    metrics_port = free_port()
    proc = start_serve(workdir, extra_env={"CREDITS_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"})
    try:
        user = fund(proc, 30)
        killed = proc.read_postmaster_pid()
        os.kill(killed, signal.SIGKILL)
        assert wait_gone(killed, 10)

        deadline = time.monotonic() + 30
        while (answer := answered(proc, user)) is None:
            assert time.monotonic() < deadline, f"no answer again\n{proc.describe()}"
            time.sleep(0.5)
        assert answer == 30
        assert proc.popen.poll() is None, "the service itself was not restarted"
        assert proc.read_postmaster_pid() != killed
        # Counted once pg_ctl says the restart is done, which may be after calls succeed again.
        deadline = time.monotonic() + 10
        while metric(metrics_port, "credits_embedded_postgres_restarts_total") != 1.0:
            assert time.monotonic() < deadline, f"restart not counted\n{proc.describe()}"
            time.sleep(0.2)
        assert "embedded PostgreSQL started again" in proc.log(), proc.describe()
        deadline = time.monotonic() + 10
        while health_status(proc.address) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, f"health not SERVING again\n{proc.describe()}"
            time.sleep(0.2)
    finally:
        proc.stop()
    assert proc.popen.returncode == 0, proc.describe()


def postgres_processes(data_dir: Path) -> list[int]:
    """The live PostgreSQL processes serving `data_dir` (zombies, not reaped yet, excluded)."""
    pgdata = str(data_dir / "postgres")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if pgdata in (process.info["cmdline"] or ()) and pid_alive(process.pid):
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("postgres", ["left running", "killed too"])
def test_after_a_killed_service_the_next_one_starts_and_stops_its_postgres(
    workdir: Path, postgres: str
) -> None:
    first = start_serve(workdir)
    user = fund(first, 7)
    postmaster = first.read_postmaster_pid()
    first.popen.kill()  # no cleanup at all: pgserver's handle of this process stays behind
    first.popen.wait(timeout=10)
    if postgres == "killed too":
        os.kill(postmaster, signal.SIGKILL)
    try:
        second = start_serve(workdir)
        try:
            assert balance(second, user) == 7
        finally:
            assert second.stop() == 0, second.describe()
        stopped = time.monotonic() + 10
        while postgres_processes(second.data_dir):
            assert time.monotonic() < stopped, (
                f"PostgreSQL left running: {postgres_processes(second.data_dir)}\n"
                f"{second.describe()}"
            )
            time.sleep(0.1)
    finally:
        first.kill()
