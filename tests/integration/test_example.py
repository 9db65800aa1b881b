"""examples/service_flow.py runs as its docstring says, against a real server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from server import app as application
from server.auth.tokens import mint_service_token
from tests.fixtures.server import TEST_JWT_SECRET, new_user

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "service_flow.py"


async def run_example(port: int, user_id: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--target",
        f"127.0.0.1:{port}",
        "--user",
        user_id,
        "--service-token",
        mint_service_token(TEST_JWT_SECRET),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, output.decode()


@pytest.mark.parametrize("server", ["postgres"], indirect=True)
async def test_the_service_flow_example_charges_what_it_says(
    server: application.Application, credits: credit_service_pb2_grpc.CreditServiceStub
) -> None:
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    code, output = await run_example(server.port, user.user_id)
    assert code == 0, output
    assert "granted 100 (replayed: False); balance after it 100" in output
    assert "the job cost 12: charged 12, balance 88" in output
    assert "refused: 1000000 required, 88 available" in output
    assert output.rstrip().endswith("final balance 88")
    # Run again: the welcome grant is a replay; only the new job is charged.
    code, output = await run_example(server.port, user.user_id)
    assert code == 0, output
    # A replay answers what the original grant answered.
    assert "granted 100 (replayed: True); balance after it 100" in output
    assert output.rstrip().endswith("final balance 76")


@pytest.mark.parametrize("server", ["postgres"], indirect=True)
async def test_the_example_explains_an_unknown_user(server: application.Application) -> None:
    code, output = await run_example(server.port, str(new_user().id))
    assert code == 1
    assert "must call the service once first" in output
