"""The service as `pip install` gives it: built into an sdist, the wheel built from that sdist,
installed into a new virtualenv and run from an empty directory far from the repository.

So the migrations, bootstrap.sql and models.toml must come from the installed package, and the
sdist must hold everything the wheel needs. The install's own `credits token` mints the token for
a real GetBalance call; SIGTERM stops the server (exit 0) and its embedded PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tomllib
import uuid
import zipfile
from pathlib import Path

import grpc
import pytest

from credits.v1 import credit_service_pb2, credit_service_pb2_grpc
from server.db.migrate import discover
from tests.fixtures.process import REPO_ROOT, pid_alive, scratch_dir, serving, wait_gone

USER_ID = uuid.UUID("5f1d0c3e-8a47-4b2e-9c61-2d7a0e9b4c10")
VERSION: str = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
BUILD_TIMEOUT = 120.0
INSTALL_TIMEOUT = 150.0
START_TIMEOUT = 60.0
RPC_TIMEOUT = 10.0

# What the installed service reads as package data, and the generated stubs it imports.
PACKAGE_DATA = [
    *(f"server/db/migrations/{m.path.name}" for m in discover()),
    "server/db/bootstrap.sql",
    "server/generation/models.toml",
    "server/py.typed",
    "credits/py.typed",
    "credits/v1/credit_service_pb2.py",
    "credits/v1/credit_service_pb2_grpc.py",
]


def run(argv: list[str | Path], *, timeout: float, cwd: Path) -> str:
    """Run a command; its stdout, or a failed assertion quoting both of its outputs."""
    result = subprocess.run(
        [str(arg) for arg in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{argv} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


def build(outdir: Path) -> Path:
    """`python -m build`: the sdist from the repository, then the wheel from that sdist."""
    run(
        [sys.executable, "-m", "build", "--outdir", outdir, REPO_ROOT],
        timeout=BUILD_TIMEOUT,
        cwd=REPO_ROOT,
    )
    [sdist] = outdir.glob("credits-*.tar.gz")
    [wheel] = outdir.glob("credits-*.whl")
    with tarfile.open(sdist) as archive:
        files = {
            member.name.split("/", 1)[1]: member
            for member in archive.getmembers()
            if "/" in member.name
        }
    for name in [*PACKAGE_DATA, "pyproject.toml"]:
        # The generated `credits` package lives under gen/python (a setuptools `where`).
        source = f"gen/python/{name}" if name.startswith("credits/") else name
        assert source in files, f"{sdist.name} lacks {source}"
        assert files[source].isfile(), f"{sdist.name}: {source} is not a regular file"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = [name for name in PACKAGE_DATA if name not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    return wheel


@pytest.mark.timeout(300)
def test_the_wheel_installs_and_serves_from_an_empty_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A clean environment: nothing that points at a database or Supabase project, nor at this
    # repository's code (the servers and commands below inherit this process's environment).
    for name in list(os.environ):
        if name.startswith("SUPABASE_") or name in ("DATABASE_URL", "PYTHONPATH", "VIRTUAL_ENV"):
            monkeypatch.delenv(name)

    with scratch_dir("credits-e2e-wheel-") as scratch:
        wheel = build(scratch / "dist")
        venv = scratch / "venv"
        run([sys.executable, "-m", "venv", venv], timeout=60, cwd=scratch)
        python, credits = venv / "bin" / "python", venv / "bin" / "credits"
        run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-c",
                REPO_ROOT / "constraints.txt",
                wheel,
            ],
            timeout=INSTALL_TIMEOUT,
            cwd=scratch,
        )

        empty = scratch / "cwd"  # empty but for the server's log file, once it runs
        empty.mkdir()
        where = run([python, "-c", "import server; print(server.__file__)"], timeout=30, cwd=empty)
        assert Path(where.strip()).is_relative_to(venv), f"`server` imported from {where}"
        assert run([credits, "--version"], timeout=30, cwd=empty) == f"credits {VERSION}\n"

        with serving(
            empty, data_dir=scratch / "data", command=credits, timeout=START_TIMEOUT
        ) as proc:
            token = proc.token("--user", str(USER_ID))
            with grpc.insecure_channel(proc.address) as channel:
                balance = credit_service_pb2_grpc.CreditServiceStub(channel).GetBalance(
                    credit_service_pb2.GetBalanceRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=RPC_TIMEOUT,
                )
            assert (balance.user_id, balance.balance) == (str(USER_ID), 0)

            assert proc.stop() == 0, proc.describe()
            assert proc.postmaster_pid is not None
            assert wait_gone(proc.postmaster_pid, RPC_TIMEOUT), "PostgreSQL outlived the server"
        assert not pid_alive(proc.popen.pid)
