"""The database, watched: a cheap probe every few seconds that health follows, and an embedded
PostgreSQL whose postmaster died started again.

Without it a database that stopped answering (frozen, unreachable) left health SERVING, and a
SIGKILLed embedded PostgreSQL left every call UNAVAILABLE until someone restarted the service.
The probe runs on a path of its own (the transport's `probe`: a dedicated connection, or one
cheap REST call), so a busy pool is neither mistaken for a lost database nor slowed by it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from server import runtime
from server.db.embedded import EmbeddedPostgres
from server.observability import metrics

log = logging.getLogger(__name__)

# How often the database is probed, and how long a probe may take before it counts as failed.
PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 1.0

# Raises (BackendUnavailable, or any error) unless the database answered within the timeout.
Probe = Callable[[float], Awaitable[None]]
# Told whether the database is reachable, each time that changes (health, say).
Report = Callable[[bool], Awaitable[None]]


async def _nobody(reachable: bool) -> None:
    return None


class DatabaseWatch:
    """Probes the database every `interval` seconds; reports each change of reachability, and
    restarts `database` (the embedded PostgreSQL this process runs, if any) when it died."""

    def __init__(
        self,
        probe: Probe,
        database: EmbeddedPostgres | None = None,
        *,
        interval: float = PROBE_INTERVAL,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self._probe = probe
        self._database = database
        self._interval = interval
        self._timeout = timeout
        self._report: Report = _nobody
        self._task: asyncio.Task[None] | None = None
        self.reachable = True
        metrics.DATABASE_REACHABLE.set(1)

    def start(self, report: Report = _nobody) -> None:
        """Watch from now on, telling `report` of every change."""
        self._report = report
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="database-watch")

    async def stop(self) -> None:
        """Stop watching (before the database is stopped: it is not to be restarted then)."""
        if self._task is not None:
            await runtime.stop(self._task)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def check(self) -> bool:
        """One round: restart a dead embedded PostgreSQL, probe, report a change; whether the
        database answered."""
        if self._database is not None and not self._database.alive():
            await restart(self._database)
        try:
            await self._probe(self._timeout)
            reachable = True
        except Exception as error:
            reachable = False
            if self.reachable:
                log.warning("the database does not answer (%s): health NOT_SERVING", _why(error))
        if reachable != self.reachable:
            self.reachable = reachable
            metrics.DATABASE_REACHABLE.set(1 if reachable else 0)
            if reachable:
                log.info("the database answers again: health SERVING")
            await self._report(reachable)
        return reachable


async def restart(database: EmbeddedPostgres) -> bool:
    """Start the embedded PostgreSQL again after its postmaster died (logged and counted in
    credits_embedded_postgres_restarts); False if it cannot start yet (tried again later)."""
    return await asyncio.to_thread(restart_blocking, database)


def restart_blocking(database: EmbeddedPostgres) -> bool:
    """`restart`, for a caller with no event loop (the supervisor of a process group)."""
    log.warning("embedded PostgreSQL (pid %s) is gone: starting it again", database.pid)
    try:
        database.restart_blocking()
    except Exception as error:  # pg_ctl failed or timed out; pgserver logged its output
        log.error("embedded PostgreSQL did not start again (%s); retrying", _why(error))
        return False
    metrics.EMBEDDED_POSTGRES_RESTARTS.inc()
    log.warning("embedded PostgreSQL started again (pid %s)", database.pid)
    return True


def _why(error: BaseException) -> str:
    """What went wrong, in a few words: the driver's error behind a BackendUnavailable."""
    error = error.__cause__ or error
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
