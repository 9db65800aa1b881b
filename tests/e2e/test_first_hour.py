"""The first hour and the bad day, as a person meets them at the command line.

- A port already in use: a second `credits serve` (or process group) on it is refused with one
  line naming the address, exit 2, and the first keeps serving; only the processes of one group
  share a port. A port held by a plain socket is refused the same way.
- `credits token` finds the server's secret by the same rule as `credits serve` and never makes
  one up unless asked (`--init`).
- Configuration mistakes are one line and exit 2, never a traceback: a SUPABASE_URL that is not
  an http(s) URL with a host, a variable set but empty.
- `credits check-config` reports a project it cannot reach as unreachable, not as missing
  migrations.
- examples/service_flow.py documents the command that runs it (tests/integration/test_example.py
  runs it so), and another Python is told in one line what to do.
"""

from __future__ import annotations

import ast
import os
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2

from credits.v1 import credit_service_pb2, credit_service_pb2_grpc
from tests.fixtures.process import (
    COMMAND_TIMEOUT,
    CREDITS,
    REPO_ROOT,
    ServeProcess,
    embedded_env,
    health_status,
    launch_serve,
    scratch_dir,
    start_serve,
)

pytestmark = pytest.mark.timeout(240)

GROUP = {"CREDITS_PROCESSES": "2"}
REFUSED_TIMEOUT = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING


def in_use(address: str) -> str:
    return f"credits: cannot listen on {address}: the address is already in use (another server?)"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with scratch_dir("credits-e2e-first-hour-") as path:
        yield path


@pytest.fixture(scope="module")
def single(workdir: Path) -> Iterator[ServeProcess]:
    """One `credits serve` (one process), its data in `<its working dir>/.data`."""
    proc = start_serve(workdir / "single")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def group(workdir: Path) -> Iterator[ServeProcess]:
    """A `credits serve` of two processes on one port."""
    proc = start_serve(workdir / "group", extra_env=GROUP)
    try:
        yield proc
    finally:
        proc.stop()


def refused_start(
    workdir: Path, port: int, extra_env: Mapping[str, str] | None = None
) -> tuple[int, list[str], Path]:
    """`credits serve` on `port` with a data dir of its own: its exit code, its output lines,
    and that data dir (the server is stopped for sure if it does start)."""
    workdir.mkdir(parents=True)
    data_dir = workdir / "data"
    proc = launch_serve(workdir, data_dir, port, extra_env)
    try:
        code = proc.wait(REFUSED_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second server started on port {port}\n{proc.describe()}")
    finally:
        proc.stop()
    return code, proc.log().splitlines(), data_dir


def still_serves(proc: ServeProcess) -> None:
    """`proc` answers health, and a user's calls on fresh connections (signed with its secret:
    none of them reaches another server)."""
    assert health_status(proc.address) == SERVING, proc.describe()
    token = proc.token()
    for _ in range(8):
        with grpc.insecure_channel(proc.address) as channel:
            stub = credit_service_pb2_grpc.CreditServiceStub(channel)
            stub.GetBalance(
                credit_service_pb2.GetBalanceRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )


def test_a_second_server_on_the_port_is_refused(workdir: Path, single: ServeProcess) -> None:
    code, lines, data_dir = refused_start(workdir / "second", single.port)
    assert (code, lines) == (2, [in_use(single.address)])
    assert not data_dir.exists(), "nothing is started for a port in use"
    still_serves(single)


def test_a_process_group_on_a_servers_port_is_refused(workdir: Path, single: ServeProcess) -> None:
    code, lines, _ = refused_start(workdir / "group-on-single", single.port, GROUP)
    assert (code, lines) == (2, [in_use(single.address)])
    still_serves(single)


def test_a_second_process_group_on_the_port_is_refused(workdir: Path, group: ServeProcess) -> None:
    code, lines, _ = refused_start(workdir / "second-group", group.port, GROUP)
    assert (code, lines) == (2, [in_use(group.address)])
    still_serves(group)


def test_a_server_on_a_process_groups_port_is_refused(workdir: Path, group: ServeProcess) -> None:
    code, lines, _ = refused_start(workdir / "single-on-group", group.port)
    assert (code, lines) == (2, [in_use(group.address)])
    still_serves(group)


@pytest.mark.parametrize("processes", ["1", "2"])
@pytest.mark.parametrize(
    "variable", ["CREDITS_LISTEN", "CREDITS_METRICS_LISTEN", "CREDITS_HTTP_LISTEN"]
)
def test_a_port_held_by_a_plain_socket_is_refused(
    workdir: Path, variable: str, processes: str
) -> None:
    with socket.socket() as holder:  # bound, not even listening
        holder.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        extra = {"CREDITS_PROCESSES": processes, variable: address}
        code, lines, _ = refused_start(workdir / f"held-{variable}-{processes}", 0, extra)
    assert (code, lines) == (2, [in_use(address)])


# `credits token`


def run(argv: list[str], cwd: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CREDITS), *argv],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def bare_env(**extra: str) -> dict[str, str]:
    """This process's environment without the service's variables (no CREDITS_DATA_DIR)."""
    env = embedded_env(Path("unused"), 0)
    for name in ("CREDITS_DATA_DIR", "CREDITS_LISTEN"):
        env.pop(name)
    return {**env, **extra}


def test_token_refuses_to_invent_a_secret() -> None:
    with scratch_dir("credits-e2e-token-") as elsewhere:
        done = run(["token", "--service"], elsewhere, bare_env())
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.splitlines() == [
            f"credits: no JWT secret at {elsewhere / '.data' / 'jwt_secret'}: run this where "
            "`credits serve` runs (its working directory, or its CREDITS_DATA_DIR), set "
            "SUPABASE_JWT_SECRET, or pass --init to make a new secret there"
        ]
        assert not (elsewhere / ".data").exists()


def test_token_init_makes_the_secret_serve_would() -> None:
    with scratch_dir("credits-e2e-token-") as elsewhere:
        done = run(["token", "--service", "--init"], elsewhere, bare_env())
        assert done.returncode == 0, done.stderr
        secret_file = elsewhere / ".data" / "jwt_secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        claims = jwt.decode(
            done.stdout.strip(),
            secret_file.read_text().strip(),
            algorithms=["HS256"],
            options={"verify_aud": False},
        )
        assert claims["role"] == "service_role"


def test_token_uses_the_servers_data_dir_rule(single: ServeProcess) -> None:
    """In the server's working directory (default ./.data) or anywhere with its
    CREDITS_DATA_DIR, the token minted is one the server accepts."""
    assert single.data_dir == single.cwd / ".data"
    with scratch_dir("credits-e2e-token-") as elsewhere:
        for cwd, env in (
            (single.cwd, bare_env()),
            (elsewhere, bare_env(CREDITS_DATA_DIR=str(single.data_dir))),
        ):
            done = run(["token"], cwd, env)
            assert done.returncode == 0, done.stderr
            with grpc.insecure_channel(single.address) as channel:
                stub = credit_service_pb2_grpc.CreditServiceStub(channel)
                stub.GetBalance(
                    credit_service_pb2.GetBalanceRequest(),
                    metadata=(("authorization", f"Bearer {done.stdout.strip()}"),),
                    timeout=10,
                )
        assert not (elsewhere / ".data").exists()


# Configuration mistakes


KEYS = {"SUPABASE_ANON_KEY": "anon", "SUPABASE_SERVICE_ROLE_KEY": "service"}


@pytest.mark.parametrize("command", ["serve", "check-config"])
@pytest.mark.parametrize("url", ["notaurl", "http://", "ftp://x.supabase.co"])
def test_a_bad_supabase_url_is_one_line(command: str, url: str) -> None:
    with scratch_dir("credits-e2e-config-") as cwd:
        done = run([command], cwd, bare_env(SUPABASE_URL=url, **KEYS))
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.splitlines() == [
            f"credits: SUPABASE_URL must be an http:// or https:// URL with a host (got {url!r})"
        ]
        assert os.listdir(cwd) == []


@pytest.mark.parametrize("command", ["serve", "check-config", "token"])
@pytest.mark.parametrize("value", ["", "  "])
def test_a_variable_set_but_empty_is_an_error(command: str, value: str) -> None:
    with scratch_dir("credits-e2e-config-") as cwd:
        done = run([command], cwd, bare_env(SUPABASE_URL=value, **KEYS))
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.splitlines() == [
            "credits: SUPABASE_URL is set but empty; unset it or give it a value"
        ]
        assert os.listdir(cwd) == [], "nothing falls back to embedded mode"


def test_an_unreachable_database_url_is_one_line() -> None:
    with socket.socket() as closed, scratch_dir("credits-e2e-config-") as cwd:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"postgresql://ada:s3cret@127.0.0.1:{closed.getsockname()[1]}/credits"
        done = run(["serve"], cwd, bare_env(DATABASE_URL=url, SUPABASE_JWT_SECRET="x" * 40))
    assert (done.returncode, done.stdout) == (2, "")
    [line] = done.stderr.splitlines()
    assert line.startswith("credits: cannot reach the database at DATABASE_URL: "), line
    assert "s3cret" not in line


def test_check_config_says_an_unreachable_project_is_unreachable() -> None:
    with socket.socket() as closed, scratch_dir("credits-e2e-config-") as cwd:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        done = run(["check-config"], cwd, bare_env(SUPABASE_URL=url, **KEYS))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    for name in ("service key accepted", "migrations applied"):
        assert f"FAIL {name}: cannot reach {url} (ConnectError)" in lines, done.stdout
    assert "not applied" not in done.stdout
    assert "missing" not in done.stdout


# The example


EXAMPLE = REPO_ROOT / "examples" / "service_flow.py"


def test_the_example_says_which_python_runs_it() -> None:
    documented = ast.get_docstring(ast.parse(EXAMPLE.read_text(encoding="utf-8")))
    assert documented is not None
    assert ".venv/bin/python examples/service_flow.py --user <uuid>" in documented
    assert '"$(.venv/bin/credits token --service)"' in documented
    # -S: a Python without the client (site-packages off).
    done = subprocess.run(
        [sys.executable, "-S", str(EXAMPLE), "--user", str(uuid.uuid4()), "--service-token", "t"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [
        f"the credits client is not installed for {sys.executable}: run this with "
        "`.venv/bin/python` from the repository root (`make run` installs it there), or "
        "`pip install ./clients/python` into this Python"
    ]
