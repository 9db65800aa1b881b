"""`credits serve` in embedded mode as a user runs it: a real process, real gRPC channels.

Two server starts share one data dir: the first on an empty dir (secret made, tokens from the
`credits token` command work, SIGTERM stops the server and its PostgreSQL, health turns
NOT_SERVING first), the second on the same dir with CREDITS_SIGNUP_CREDITS=7 (data and secret
kept; a new profile starts with 7).
"""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2

from credits.v1 import credit_service_pb2, credit_service_pb2_grpc, ledger_pb2
from server.app import SERVICE_NAMES
from server.auth.tokens import mint_user_token
from tests.fixtures.process import (
    ServeProcess,
    health_status,
    health_watch,
    scratch_dir,
    start_serve,
    wait_gone,
)

USER_ID = uuid.UUID("0b6c8a52-7d0e-4f57-9d2b-3f7e3e1c4a01")
GRANT = credit_service_pb2.GrantCreditsRequest(
    user_id=str(USER_ID), amount=42, idempotency_key="e2e-welcome", description="e2e welcome"
)
SIGNUP_CREDITS = 7
EXIT_TIMEOUT = 8.0
RPC_TIMEOUT = 10.0


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class FirstRun:
    """The first server on an empty data dir, and what was made while it ran."""

    proc: ServeProcess
    secret: str
    user_token: str
    service_token: str

    def credits(self, channel: grpc.Channel) -> credit_service_pb2_grpc.CreditServiceStub:
        return credit_service_pb2_grpc.CreditServiceStub(channel)

    def grant(self) -> credit_service_pb2.GrantCreditsResponse:
        """The test grant (idempotent: later calls replay the first).

        The user's own call comes first: it creates their profile, which a grant needs.
        """
        with grpc.insecure_channel(self.proc.address) as channel:
            stub = self.credits(channel)
            stub.GetBalance(
                credit_service_pb2.GetBalanceRequest(),
                metadata=bearer(self.user_token),
                timeout=RPC_TIMEOUT,
            )
            response: credit_service_pb2.GrantCreditsResponse = stub.GrantCredits(
                GRANT, metadata=bearer(self.service_token), timeout=RPC_TIMEOUT
            )
            return response


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with scratch_dir("credits-e2e-serve-") as path:
        yield path


@pytest.fixture(scope="module")
def data_dir(workdir: Path) -> Path:
    return workdir / "data"


@pytest.fixture(scope="module")
def first(workdir: Path, data_dir: Path) -> Iterator[FirstRun]:
    """`credits serve` on an empty data dir, with tokens minted by `credits token`."""
    assert not data_dir.exists()
    proc = start_serve(workdir / "first-run", data_dir=data_dir)
    try:
        secret = (data_dir / "jwt_secret").read_text().strip()
        yield FirstRun(
            proc,
            secret,
            user_token=proc.token("--user", str(USER_ID)),
            service_token=proc.token("--service"),
        )
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def second(workdir: Path, data_dir: Path, first: FirstRun) -> Iterator[ServeProcess]:
    """A second `credits serve` on the first one's data dir (after the first stopped)."""
    if first.proc.popen.poll() is None:
        first.grant()
        first.proc.stop()
    proc = start_serve(
        workdir / "second-run",
        data_dir=data_dir,
        extra_env={"CREDITS_SIGNUP_CREDITS": str(SIGNUP_CREDITS)},
    )
    try:
        yield proc
    finally:
        proc.stop()


def test_first_start_makes_a_private_secret_and_cli_tokens_work(first: FirstRun) -> None:
    proc = first.proc
    for name in ("", *SERVICE_NAMES):
        assert health_status(proc.address, name) == health_pb2.HealthCheckResponse.SERVING, name

    secret_file = proc.data_dir / "jwt_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert len(first.secret) >= 32
    assert (proc.data_dir / "postgres" / "PG_VERSION").is_file()
    assert proc.postmaster_pid is not None

    with grpc.insecure_channel(proc.address) as channel:
        stub = first.credits(channel)
        balance = stub.GetBalance(
            credit_service_pb2.GetBalanceRequest(),
            metadata=bearer(first.user_token),
            timeout=RPC_TIMEOUT,
        )
        assert (balance.user_id, balance.balance, balance.held, balance.available) == (
            str(USER_ID),
            0,
            0,
            0,
        )

        # A user token may not grant; the service token may.
        with pytest.raises(grpc.RpcError) as refused:
            stub.GrantCredits(GRANT, metadata=bearer(first.user_token), timeout=RPC_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    granted = first.grant()
    assert granted.balance == 42
    assert granted.transaction.kind == ledger_pb2.TRANSACTION_KIND_GRANT
    assert granted.transaction.user_id == str(USER_ID)
    assert granted.transaction.amount == 42
    assert not granted.replayed


def _claims(token: str, secret: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, secret, algorithms=["HS256"], options={"verify_aud": False}
    )
    return claims


def test_python_m_server_token_is_credits_token(first: FirstRun) -> None:
    proc = first.proc
    by_module = proc.run([sys.executable, "-m", "server", "token", "--service"]).stdout
    by_script = proc.token("--service")

    assert by_module.endswith("\n")
    module_token = by_module.strip()
    assert module_token.count(".") == 2, by_module
    assert "\n" not in module_token, by_module
    module_claims = _claims(module_token, first.secret)
    script_claims = _claims(by_script, first.secret)
    assert module_claims["role"] == script_claims["role"] == "service_role"
    assert module_claims.keys() == script_claims.keys()

    with grpc.insecure_channel(proc.address) as channel:
        balance = first.credits(channel).GetBalance(
            credit_service_pb2.GetBalanceRequest(user_id=str(USER_ID)),
            metadata=bearer(module_token),
            timeout=RPC_TIMEOUT,
        )
    assert balance.user_id == str(USER_ID)


def test_sigterm_turns_health_not_serving_then_stops_server_and_postgres(
    first: FirstRun,
) -> None:
    proc = first.proc
    assert first.grant().balance == 42  # the data the restart must find (idempotent)
    postmaster = proc.read_postmaster_pid()
    assert postmaster == proc.postmaster_pid

    with grpc.insecure_channel(proc.address) as channel:
        watch = health_watch(channel, "", timeout=RPC_TIMEOUT)
        try:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            # The server is still up (this stream is in flight) when health changes.
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING, proc.describe()
        finally:
            watch.cancel()

    try:
        code = proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {EXIT_TIMEOUT} s after SIGTERM\n{proc.describe()}")
    took = time.monotonic() - sent
    assert code == 0, proc.describe()
    assert wait_gone(postmaster, timeout=5.0), f"PostgreSQL (pid {postmaster}) still running"
    assert not proc.postmaster_pid_file.exists()
    assert took < EXIT_TIMEOUT
    assert "stopped" in proc.log().splitlines()[-1], proc.describe()


def test_restart_keeps_data_and_secret(first: FirstRun, second: ServeProcess) -> None:
    assert first.proc.popen.poll() == 0
    assert (second.data_dir / "jwt_secret").read_text().strip() == first.secret
    assert health_status(second.address) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(second.address) as channel:
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        # The token minted against the first process is still valid: same secret.
        balance = stub.GetBalance(
            credit_service_pb2.GetBalanceRequest(),
            metadata=bearer(first.user_token),
            timeout=RPC_TIMEOUT,
        )
        assert (balance.balance, balance.available) == (42, 42)
        replay = stub.GrantCredits(GRANT, metadata=bearer(first.service_token), timeout=RPC_TIMEOUT)
        assert replay.replayed
        assert replay.balance == 42


def test_signup_credits_start_a_new_profile(second: ServeProcess) -> None:
    secret = (second.data_dir / "jwt_secret").read_text().strip()
    newcomer = uuid.uuid4()
    metadata = bearer(mint_user_token(secret, newcomer))
    with grpc.insecure_channel(second.address) as channel:
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        balance = stub.GetBalance(
            credit_service_pb2.GetBalanceRequest(), metadata=metadata, timeout=RPC_TIMEOUT
        )
        assert (balance.user_id, balance.balance, balance.held, balance.available) == (
            str(newcomer),
            SIGNUP_CREDITS,
            0,
            SIGNUP_CREDITS,
        )
        ledger = stub.ListTransactions(
            credit_service_pb2.ListTransactionsRequest(), metadata=metadata, timeout=RPC_TIMEOUT
        )
    # "recorded as a ledger grant" (README, CREDITS_SIGNUP_CREDITS)
    assert [(t.kind, t.amount, t.balance_after) for t in ledger.transactions] == [
        (ledger_pb2.TRANSACTION_KIND_GRANT, SIGNUP_CREDITS, SIGNUP_CREDITS)
    ]
