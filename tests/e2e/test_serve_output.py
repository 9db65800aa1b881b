"""Everything `credits serve` prints is a JSON line, from its start to its graceful stop (gRPC
core once printed a plain `fork_posix.cc ... skipping fork() handlers` line on every stop, when
the embedded PostgreSQL was stopped with pg_ctl while grpc's threads ran)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc

from credits.v1 import credit_service_pb2, credit_service_pb2_grpc
from tests.fixtures.process import ServeProcess, scratch_dir, start_serve


def not_json(proc: ServeProcess) -> list[str]:
    """The lines of the server's stdout and stderr that are not a JSON object."""
    bad = []
    for line in proc.log().splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            bad.append(line)
    return bad


def test_every_line_from_start_to_a_graceful_stop_is_json() -> None:
    with scratch_dir("credits-e2e-output-") as workdir:
        proc = start_serve(Path(workdir))
        try:
            token = proc.token("--user", "0b9f6c4e-1d2a-4c3b-8e5f-6a7b8c9d0e1f")
            with grpc.insecure_channel(proc.address) as channel:
                credit_service_pb2_grpc.CreditServiceStub(channel).GetBalance(
                    credit_service_pb2.GetBalanceRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10,
                )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, proc.describe()
        finally:
            proc.stop()
        assert "stopped" in proc.log().splitlines()[-1], proc.describe()
        assert not_json(proc) == [], proc.describe()
