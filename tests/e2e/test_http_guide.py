"""docs/http.md's session, curl against a real `credits serve`'s Connect edge, and its coverage
of the API.

The guide's ```sh blocks run in order through bash, at the repository root, against a fresh
embedded-mode server whose Connect edge listens on a free port (the documented
127.0.0.1:8080 is replaced by it, as 127.0.0.1:50051 is by the gRPC port) and allows the
documented origin; every command's output and exit code must be what the guide shows after it,
once server-made ids and timestamps are normalised (tests/fixtures/transcript.py). The guide
must show a curl of every RPC of both services, so a new RPC needs an entry.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pytest

from credits.v1 import credit_service_pb2, generation_service_pb2
from tests.fixtures.process import REPO_ROOT, free_port, scratch_dir, serving
from tests.fixtures.transcript import (
    DOCUMENTED_HTTP_ADDRESS,
    Session,
    SessionRun,
    parse_session,
    run_session,
    session_diff,
)

GUIDE = REPO_ROOT / "docs" / "http.md"
SERVICES = (
    credit_service_pb2.DESCRIPTOR.services_by_name["CreditService"],
    generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"],
)
# `http://<address>/package.Service/Method` in a curl command line.
CALL = re.compile(rf"http://{re.escape(DOCUMENTED_HTTP_ADDRESS)}/([\w.]+)/(\w+)")
CORS_ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def session() -> Session:
    parsed = parse_session(GUIDE.read_text(encoding="utf-8"))
    assert parsed.steps, f"no ```sh blocks in {GUIDE}"
    assert parsed.steps[0].is_setup, "the guide does not start with the block making the tokens"
    return parsed


@pytest.fixture(scope="module")
def run(session: Session) -> Iterator[SessionRun]:
    """A fresh embedded-mode server with its Connect edge, and every block run in order."""
    extra = {
        "CREDITS_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
        "CREDITS_HTTP_CORS_ORIGINS": CORS_ORIGIN,
    }
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(scratch_dir("credits-e2e-http-guide-"))
        proc = stack.enter_context(serving(workdir, extra_env=extra))
        yield run_session(session, proc)


def test_guide_session_matches_a_real_server(run: SessionRun) -> None:
    """Every command's output and exit code are what the guide shows (normalised)."""
    diff = session_diff(run, "docs/http.md (normalised)", "real server (normalised)")
    if diff:
        pytest.fail(
            f"docs/http.md's session differs from what the server answers:\n{diff}\n\n"
            f"{run.proc.describe()}",
            pytrace=False,
        )


def test_guide_curls_every_rpc_of_both_services(session: Session) -> None:
    rpcs = {f"{s.full_name}/{m.name}" for s in SERVICES for m in s.methods}
    shown = {
        f"{match.group(1)}/{match.group(2)}"
        for step in session.commands
        for match in CALL.finditer(step.command)
    }
    missing = sorted(rpcs - shown)
    assert not missing, f"docs/http.md shows no curl (with output) for: {missing}"
    assert not shown - rpcs, f"docs/http.md calls RPCs the protos do not declare: {shown - rpcs}"


def test_guide_shows_a_stream_errors_with_details_health_and_cors(session: Session) -> None:
    outputs = "\n".join(step.expected or "" for step in session.commands)
    assert "end of stream: {}" in outputs, "no server stream read to its end"
    assert '"type": "google.rpc.ErrorInfo"' in outputs, "no error with its details"
    assert "/healthz" in "\n".join(step.command for step in session.commands)
    assert "access-control-allow-origin" in outputs.lower(), "no CORS preflight"
