"""Marks overdue pending holds expired, in the background.

Bookkeeping only: every SQL function already decides a hold's expiry by time, so a late or
stopped sweeper never lets an expired hold count or be captured. Several processes may sweep at
once; the SQL skips users another transaction holds, and users whose settlement fails (each is
settled on its own and named in a WARNING, which the direct transport logs). After each sweep,
how long the user due longest has waited is a gauge (credits_settlement_lag_seconds), which
such a user keeps growing on either transport.
"""

from __future__ import annotations

import asyncio
import logging

from server import runtime
from server.credit.ports import HoldExpiry
from server.errors import CreditsError
from server.observability import metrics

log = logging.getLogger(__name__)


class HoldSweeper:
    def __init__(self, store: HoldExpiry, interval: float = 30.0, batch: int = 100) -> None:
        self._store = store
        self._interval = interval
        self._batch = batch
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        """Expire every overdue hold now, and note how far behind settlement is left (users
        it could not settle); returns how many users' holds were swept."""
        total = 0
        while True:
            swept = await self._store.expire_holds(self._batch)
            total += swept
            if swept < self._batch:
                break
        metrics.SETTLEMENT_LAG_SECONDS.set(await self._store.settlement_lag())
        return total

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hold-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            await runtime.stop(self._task)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                swept = await self.sweep()
                if swept:
                    log.info("expired overdue holds of %d users", swept)
            except CreditsError as error:
                # The database is down or refuses us; the next round tries again.
                log.warning("hold sweep failed: %s", error.reason)
            except Exception:
                metrics.unexpected("hold_sweeper", log, "hold sweep failed unexpectedly")
            await asyncio.sleep(self._interval)
