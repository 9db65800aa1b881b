"""`credits serve` stopped the hard and the gentle way while it works: the ledger stays
consistent, and a graceful stop lets in-flight RPCs finish."""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from credits.v1 import credit_service_pb2 as cpb
from credits.v1 import credit_service_pb2_grpc, generation_pb2, generation_service_pb2_grpc
from credits.v1 import generation_service_pb2 as gpb
from tests.fixtures.process import ServeProcess, scratch_dir, start_serve

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
            first = next(watch)
            proc.send_signal(signal.SIGTERM)
            states = [first.generation.state, *(m.generation.state for m in watch)]
        assert states[-1] == generation_pb2.GENERATION_STATE_SUCCEEDED, states
        assert proc.wait(timeout=15) == 0
    finally:
        proc.stop()
