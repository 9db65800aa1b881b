"""docs/grpcurl.md's session, run against a real `credits serve`, and its coverage of the API.

The guide's ```sh blocks run in order through bash, at the repository root, against a fresh
embedded-mode server on a free port; every command's output (stdout, or the `-format-error`
status on stderr) and exit code must be what the guide shows after it, once server-made ids and
timestamps are normalised (tests/fixtures/transcript.py, shared with the README's test). The
guide must also show a command for every RPC of both services, so a new RPC needs an entry.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pytest

from credits.v1 import credit_service_pb2, generation_service_pb2
from tests.fixtures.process import REPO_ROOT, scratch_dir, serving
from tests.fixtures.transcript import (
    DOCUMENTED_ADDRESS,
    GRPCURL_STATUS_EXIT_BASE,
    Session,
    SessionRun,
    parse_session,
    run_session,
    session_diff,
)

GUIDE = REPO_ROOT / "docs" / "grpcurl.md"
SERVICES = (
    credit_service_pb2.DESCRIPTOR.services_by_name["CreditService"],
    generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"],
)
# `<address> package.Service/Method` in a grpcurl command line.
CALL = re.compile(rf"{re.escape(DOCUMENTED_ADDRESS)}\s+([\w.]+)/(\w+)")
# Error statuses the guide must show how to read (by their -format-error code).
ERROR_CODES = {
    3: "INVALID_ARGUMENT",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    16: "UNAUTHENTICATED",
}


def all_rpcs() -> set[str]:
    """Every RPC of both credits services, as `package.Service/Method`."""
    return {
        f"{service.full_name}/{method.name}" for service in SERVICES for method in service.methods
    }


def documented_rpcs(session: Session) -> set[str]:
    """The RPCs that a command of `session` with a documented output calls."""
    return {
        f"{match.group(1)}/{match.group(2)}"
        for step in session.commands
        for match in CALL.finditer(step.command)
    }


@pytest.fixture(scope="module")
def session() -> Session:
    """The guide's session, checked to start with the setup that makes the tokens."""
    parsed = parse_session(GUIDE.read_text(encoding="utf-8"))
    assert parsed.steps, f"no ```sh blocks in {GUIDE}"
    assert parsed.steps[0].is_setup, (
        "the guide does not start with a setup block (USER_TOKEN=..., SERVICE_TOKEN=...)"
    )
    return parsed


@pytest.fixture(scope="module")
def run(session: Session) -> Iterator[SessionRun]:
    """A fresh embedded-mode server, and every block of the guide run against it in order."""
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(scratch_dir("credits-e2e-guide-"))
        proc = stack.enter_context(serving(workdir))
        yield run_session(session, proc)


def test_guide_session_matches_a_real_server(run: SessionRun) -> None:
    """Every command's output and exit code are what the guide shows (normalised)."""
    diff = session_diff(run, "docs/grpcurl.md (normalised)", "real server (normalised)")
    if diff:
        pytest.fail(
            f"docs/grpcurl.md's session differs from what the server answers:\n{diff}\n\n"
            f"{run.proc.describe()}",
            pytrace=False,
        )


def test_guide_calls_every_rpc_of_both_services(session: Session) -> None:
    """A command with its output for each RPC the protos declare, and none the server lacks."""
    rpcs = all_rpcs()
    assert len(rpcs) >= 16, f"the descriptors name only {sorted(rpcs)}"
    shown = {rpc for rpc in documented_rpcs(session) if rpc.startswith("credits.")}
    missing = sorted(rpcs - shown)
    assert not missing, f"docs/grpcurl.md shows no command (with output) for: {missing}"
    unknown = sorted(shown - rpcs)
    assert not unknown, f"docs/grpcurl.md calls RPCs the protos do not declare: {unknown}"


def test_guide_shows_the_errors_and_health_checks(session: Session) -> None:
    """Each promised error status, read with -format-error, and both kinds of health check."""
    exits = {step.expected_exit for step in session.commands}
    absent = [
        name for code, name in ERROR_CODES.items() if GRPCURL_STATUS_EXIT_BASE + code not in exits
    ]
    assert not absent, f"docs/grpcurl.md shows no -format-error output for: {absent}"
    assert any("google.rpc.BadRequest" in (s.expected or "") for s in session.commands), (
        "docs/grpcurl.md shows no BadRequest field violation"
    )
    checks = [s for s in session.commands if "grpc.health.v1.Health/Check" in s.command]
    assert any('"service"' not in s.command for s in checks), "no overall health check"
    assert any('"service": "credits.v1.' in s.command for s in checks), (
        "no health check of a named credits service"
    )
