"""The embedded PostgreSQL (start, keep data, stop) and the embedded JWT secret file."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg

from server.auth.secret_store import load_or_create_jwt_secret
from server.db import embedded


def postmaster_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once the process has exited (a zombie nobody has reaped yet counts as exited)."""
    # pg_ctl stop returns when postmaster.pid is removed, a moment before the process exits.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        status = Path(f"/proc/{pid}/status")
        with contextlib.suppress(FileNotFoundError):
            if "State:\tZ" in status.read_text():
                return True
        time.sleep(0.05)
    return False


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_data_survives_a_restart_and_stop_ends_the_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "nested"  # missing on purpose: start creates it
    server = await embedded.start(data_dir)
    try:
        assert (data_dir / "postgres" / "PG_VERSION").is_file()
        conn = await asyncpg.connect(server.uri)
        try:
            await conn.execute("create table kept (note text); insert into kept values ('hi')")
        finally:
            await conn.close()
    finally:
        await server.astop()
    assert server.pid is not None
    assert postmaster_gone(server.pid)

    # A process that held the server and died without cleaning up must not keep it alive.
    handles = data_dir / "postgres" / ".handle_pids.json"
    handles.write_text(json.dumps([dead_pid()]))

    again = await embedded.start(data_dir)
    try:
        conn = await asyncpg.connect(again.uri)
        try:
            assert await conn.fetchval("select note from kept") == "hi"
        finally:
            await conn.close()
    finally:
        await again.astop()
        again.stop()  # idempotent
    assert again.pid is not None
    assert postmaster_gone(again.pid)


def test_secret_is_created_private_and_stable(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    secret = load_or_create_jwt_secret(data_dir)

    path = data_dir / "jwt_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 43  # at least 32 bytes of entropy in url-safe base64
    assert load_or_create_jwt_secret(data_dir) == secret
    assert [p.name for p in data_dir.iterdir()] == ["jwt_secret"]  # no temp files left


def test_concurrent_creators_agree_on_one_secret(tmp_path: Path) -> None:
    creators = 16
    barrier = threading.Barrier(creators)

    def create() -> str:
        barrier.wait()
        return load_or_create_jwt_secret(tmp_path)

    with ThreadPoolExecutor(creators) as pool:
        secrets = list(pool.map(lambda _: create(), range(creators)))
    assert len(set(secrets)) == 1
    assert (tmp_path / "jwt_secret").read_text().strip() == secrets[0]


def test_too_open_secret_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "jwt_secret"
    path.write_text("x" * 64 + "\n")
    path.chmod(0o644)
    assert load_or_create_jwt_secret(tmp_path) == "x" * 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
