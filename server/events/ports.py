"""What the events domain needs from storage (implemented by server/repository/events.py)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

from server.auth.principal import Principal
from server.credit.models import Profile
from server.events.models import (
    Balance,
    BalanceRead,
    ClaimedDelivery,
    Delivery,
    DeliveryStats,
    Endpoint,
    Event,
)


class EventStore(Protocol):
    async def list_events(
        self, after: uuid.UUID | None, types: Sequence[str] | None, limit: int
    ) -> Sequence[Event]: ...

    async def set_balance_alerts(
        self, user_id: uuid.UUID, thresholds: Sequence[int] | None
    ) -> Profile: ...

    async def get_profile(self, principal: Principal, user_id: uuid.UUID) -> Profile: ...

    async def watch_balance(
        self, principal: Principal, user_id: uuid.UUID, seconds: int
    ) -> BalanceRead: ...

    async def get_balance(self, principal: Principal, user_id: uuid.UUID) -> Balance: ...


class DeliveryQueue(Protocol):
    async def dispatch(self, limit: int) -> int: ...

    async def notice_expiring_grants(self, limit: int) -> int: ...

    async def claim(
        self, worker: str, limit: int, lease_seconds: int
    ) -> Sequence[ClaimedDelivery]: ...

    async def finish(
        self,
        delivery_id: uuid.UUID,
        worker: str,
        *,
        delivered: bool,
        status: int | None,
        error: str,
        retry_seconds: float | None,
    ) -> str | None: ...

    async def stats(self) -> DeliveryStats: ...


class WebhookAdmin(Protocol):
    async def add(self, url: str, event_types: Sequence[str], secret: str) -> Endpoint: ...

    async def endpoints(self) -> Sequence[Endpoint]: ...

    async def remove(self, endpoint_id: uuid.UUID) -> None: ...

    async def rotate_secret(self, endpoint_id: uuid.UUID, secret: str) -> Endpoint: ...

    async def deliveries(self, state: str | None, limit: int) -> Sequence[Delivery]: ...

    async def retry(self, delivery_id: uuid.UUID) -> Delivery: ...
