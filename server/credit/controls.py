"""Spend controls and reports of the contract: spending limits, usage by period, the ledger's
export. Who may call and what is valid; the store (and the SQL behind it) does the rest."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from server.auth.principal import Principal
from server.credit.models import (
    ExportCursor,
    ExportQuery,
    SpendLimit,
    SpendPeriod,
    Transaction,
    UsageBucket,
    UsageGranularity,
    UsageGroupBy,
    UsageQuery,
)
from server.credit.ports import ControlStore
from server.domain import access, validation
from server.errors import InvalidArgument

# GetUsage answers at most this many periods (hours, days or months) per call.
MAX_USAGE_PERIODS = 1000
# The ledger entries one batch of an export reads (and one streamed message carries).
EXPORT_BATCH = 1000

_PERIOD_HOURS = {
    UsageGranularity.HOUR: 1,
    UsageGranularity.DAY: 24,
    # The shortest month: a range of this many periods never spans more.
    UsageGranularity.MONTH: 24 * 28,
}


class SpendControls:
    def __init__(self, store: ControlStore, *, export_batch: int = EXPORT_BATCH) -> None:
        self._store = store
        self._export_batch = export_batch

    async def set_spend_limit(
        self, principal: Principal, user_id: str, period: SpendPeriod | None, limit: int
    ) -> list[SpendLimit]:
        """Sets the user's own limit for `period` (0 removes it); returns the limits in force.
        Service only."""
        access.require_service(principal)
        target = access.target_user(principal, user_id)
        if period is None:
            raise InvalidArgument.one("period", "must be SPEND_PERIOD_DAY, _WEEK or _MONTH")
        if limit < 0:
            raise InvalidArgument.one("limit", "must be 0 (none) or positive")
        return await self._store.set_spend_limit(principal, target, period, limit)

    async def get_spend_limits(self, principal: Principal, user_id: str) -> list[SpendLimit]:
        return await self._store.get_spend_limits(principal, access.target_user(principal, user_id))

    async def get_usage(
        self,
        principal: Principal,
        user_id: str,
        start: datetime | None,
        end: datetime | None,
        granularity: UsageGranularity | None,
        group_by: UsageGroupBy,
    ) -> list[UsageBucket]:
        target = access.target_user(principal, user_id)
        query = usage_query(start, end, granularity, group_by)
        return await self._store.get_usage(principal, target, query)

    async def export(
        self,
        principal: Principal,
        user_id: str,
        *,
        all_users: bool,
        start: datetime | None,
        end: datetime | None,
    ) -> AsyncIterator[list[Transaction]]:
        """The ledger (one user's, or every user's) in batches, read batch by batch as the
        caller takes them: never more than one batch in memory. Service only."""
        access.require_service(principal)
        if all_users == bool(user_id):
            raise InvalidArgument.one("user_id", "name one user, or ask for all users")
        validation.time_range(start, end)
        target = None if all_users else access.target_user(principal, user_id)
        return self._batches(ExportQuery(target, start, end))

    async def _batches(self, query: ExportQuery) -> AsyncIterator[list[Transaction]]:
        after: ExportCursor | None = None
        while True:
            batch = await self._store.export_transactions(query, after, self._export_batch)
            if batch:
                yield batch
            if len(batch) < self._export_batch:
                return
            after = ExportCursor(batch[-1].user_id, batch[-1].seq)


def usage_query(
    start: datetime | None,
    end: datetime | None,
    granularity: UsageGranularity | None,
    group_by: UsageGroupBy,
) -> UsageQuery:
    """GetUsage's arguments checked: both times given, in whole hours, `end` after `start`, a
    granularity, at most MAX_USAGE_PERIODS periods."""
    if start is None:
        raise InvalidArgument.one("start_time", "is required")
    if end is None:
        raise InvalidArgument.one("end_time", "is required")
    for field, value in (("start_time", start), ("end_time", end)):
        if value.minute or value.second or value.microsecond:
            raise InvalidArgument.one(field, "must be a whole hour (UTC)")
    validation.time_range(start, end)
    if granularity is None:
        raise InvalidArgument.one("granularity", "must be hour, day or month")
    periods = math.ceil((end - start) / timedelta(hours=_PERIOD_HOURS[granularity]))
    if periods > MAX_USAGE_PERIODS:
        raise InvalidArgument.one(
            "end_time", f"the range may span at most {MAX_USAGE_PERIODS} {granularity}s"
        )
    return UsageQuery(start, end, granularity, group_by)
