"""The embedded PostgreSQL: a server of our own from the pip-installed `pgserver` wheel.

Used when neither DATABASE_URL nor SUPABASE_URL is configured. The data lives in
`<data_dir>/postgres`, so a later start on the same data dir finds the same databases.
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        embedded = cls(server, pgdata)
        _logger.info("embedded PostgreSQL ready in %s (pid %s)", pgdata, embedded.pid)
        return embedded

    def stop(self) -> None:
        """Stop the server (blocking; idempotent). Another process sharing the data dir keeps it."""
        if self._stopped:
            return
        self._stopped = True
        self._server.cleanup()
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
