"""The embedded PostgreSQL: a server of our own from the pip-installed `pgserver` wheel.

Used when neither DATABASE_URL nor SUPABASE_URL is configured. The data lives in
`<data_dir>/postgres`, so a later start on the same data dir finds the same databases. A server
whose postmaster died (SIGKILLed, say) is started again on the same data dir and socket
(`restart_blocking`; server/db/watch.py decides when), and a start after a crash clears what the
dead processes left behind, so they neither block it nor keep the server from being stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

_logger = logging.getLogger(__name__)

PGDATA_NAME = "postgres"


def _import_pgserver() -> ModuleType:
    """Import pgserver without its import-time noise.

    platformdirs warns (RuntimeDirWarning) when XDG_RUNTIME_DIR is unset, as in containers and
    services; its /tmp fallback is fine for pgserver's lock file, so the warning says nothing
    useful. pgserver logs every command at INFO; keep it to warnings unless someone asked.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR", category=UserWarning)
        import pgserver

    pg_logger = logging.getLogger("pgserver")
    if pg_logger.level == logging.NOTSET:
        pg_logger.setLevel(logging.WARNING)
    return pgserver


def bin_dir() -> Path:
    """Where the wheel's PostgreSQL programs are (postgres, pg_ctl, psql, pgbench...)."""
    module = _import_pgserver().__file__
    assert module is not None  # an installed package, not a namespace
    return Path(module).parent / "pginstall" / "bin"


def _forget_dead_handles(pgserver: ModuleType, pgdata: Path) -> None:
    """Drop pids of dead processes from pgserver's handle list for this data dir.

    pgserver stops the server only when the last process holding a handle lets go; a process
    killed without running its atexit hook stays on the list forever and the server would then
    never be stopped again. Done under pgserver's own inter-process lock.
    """
    handles = pgdata / ".handle_pids.json"
    with pgserver.PostgresServer._lock:
        try:
            pids: list[int] = json.loads(handles.read_text())
        except (FileNotFoundError, ValueError):
            return
        alive = [pid for pid in pids if _pid_alive(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))


def _forget_dead_postmaster(pgdata: Path) -> None:
    """Remove the lock files of a postmaster that is dead or a zombie (one not reaped yet: a
    container's init may take its time): postmaster.pid and its socket's `.lock`. pgserver
    would take the zombie for a running server, and PostgreSQL refuses to start while a lock
    file names a process that answers kill(pid, 0), as a zombie does."""
    pid_file = pgdata / "postmaster.pid"
    try:
        # pid, data dir, start time, port, socket dir, ... (PostgreSQL's miscadmin.h).
        lines = pid_file.read_text().splitlines()
        pid = int(lines[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    if _pid_alive(pid):
        return
    _logger.warning("removing the lock files of PostgreSQL pid %d (exited) in %s", pid, pgdata)
    if len(lines) > 4 and lines[3].strip() and lines[4].strip():
        socket_lock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock"
        try:
            if int(socket_lock.read_text().split()[0]) == pid:
                socket_lock.unlink()
        except (FileNotFoundError, ValueError, IndexError):
            pass
    pid_file.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not reaped yet) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        # /proc/<pid>/stat: "pid (name) state ..."; the name may hold spaces or parentheses.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS), or it just exited: the signal said it ran
    return state not in ("Z", "X")


class EmbeddedPostgres:
    """A running embedded PostgreSQL; `stop()` stops it (when no other process still uses it)."""

    def __init__(self, server: Any, pgdata: Path) -> None:
        self._server = server
        self.pgdata = pgdata
        self.uri: str = server.get_uri()
        self.pid: int | None = server.get_pid()
        self._stopped = False

    @classmethod
    def start_blocking(cls, data_dir: Path) -> EmbeddedPostgres:
        """Start (initdb on first use) PostgreSQL in `<data_dir>/postgres`; blocks for seconds."""
        pgserver = _import_pgserver()
        data_dir = Path(data_dir).expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        pgdata = data_dir / PGDATA_NAME
        if pgdata.is_dir():
            _forget_dead_handles(pgserver, pgdata)
            with pgserver.PostgresServer._lock:
                _forget_dead_postmaster(pgdata)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        embedded = cls(server, pgdata)
        _logger.info("embedded PostgreSQL ready in %s (pid %s)", pgdata, embedded.pid)
        return embedded

    def alive(self) -> bool:
        """Whether the postmaster this server started with (or was restarted with) still runs."""
        return self.pid is not None and _pid_alive(self.pid)

    def restart_blocking(self) -> None:
        """Start PostgreSQL again after its postmaster died, on the same data dir and socket
        (so the URL stays the same); blocks for seconds while it recovers. Raises when it
        cannot start yet (the dead server's backends still hold its shared memory, say)."""
        pgserver = _import_pgserver()
        with pgserver.PostgresServer._lock:
            _forget_dead_postmaster(self.pgdata)
            self._server.ensure_postgres_running()
        self.pid = self._server.get_pid()
        uri = self._server.get_uri()
        if uri != self.uri:  # never seen: the socket dir is derived from the data dir
            _logger.error("embedded PostgreSQL restarted at %s, not %s", uri, self.uri)

    def stop(self) -> None:
        """Stop the server (blocking; idempotent). Another process sharing the data dir keeps it."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._server.cleanup()
        except Exception:
            # pgserver's stop raises when the server died meanwhile (its kill finds no process).
            if self.alive():
                raise
            _logger.warning("embedded PostgreSQL in %s had already stopped", self.pgdata)
            return
        _logger.info("embedded PostgreSQL in %s released", self.pgdata)

    async def astop(self) -> None:
        """`stop()` from async code, off the event loop."""
        await asyncio.to_thread(self.stop)

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(pgdata={self.pgdata!s}, pid={self.pid}, stopped={self._stopped})"


async def start(data_dir: Path) -> EmbeddedPostgres:
    """Start the embedded PostgreSQL in a worker thread so the event loop keeps running."""
    return await asyncio.to_thread(EmbeddedPostgres.start_blocking, data_dir)


__all__ = ["EmbeddedPostgres", "start"]
