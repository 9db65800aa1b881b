"""The events domain's stores (server/events/ports.py) over the SQL functions."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

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
from server.repository import functions as fn
from server.repository.layered import LayeredRepository


class EventRepository:
    """EventStore, DeliveryQueue and WebhookAdmin in one: the service role for all but the
    user's own reads (GetProfile, WatchBalance)."""

    def __init__(self, layers: LayeredRepository) -> None:
        self._layers = layers

    async def configure(
        self, *, low_balance_thresholds: Sequence[int], expiry_notice_seconds: int
    ) -> None:
        """The default thresholds and the expiry notice (CREDITS_LOW_BALANCE_THRESHOLDS,
        CREDITS_EXPIRY_NOTICE), written at start."""
        call = fn.ConfigureEvents(list(low_balance_thresholds), expiry_notice_seconds)
        await self._layers.call_as_service(call)

    # EventStore

    async def list_events(
        self, after: uuid.UUID | None, types: Sequence[str] | None, limit: int
    ) -> Sequence[Event]:
        call = fn.ListEvents(after, list(types) if types else None, limit)
        return await self._layers.call_as_service(call)

    async def set_balance_alerts(
        self, user_id: uuid.UUID, thresholds: Sequence[int] | None
    ) -> Profile:
        wanted = list(thresholds) if thresholds is not None else None
        return await self._layers.call_as_service(fn.SetBalanceAlerts(user_id, wanted))

    async def get_profile(self, principal: Principal, user_id: uuid.UUID) -> Profile:
        return await self._layers.call(principal, fn.GetProfileAlerts(user_id))

    async def watch_balance(
        self, principal: Principal, user_id: uuid.UUID, seconds: int
    ) -> BalanceRead:
        return await self._layers.call(principal, fn.WatchBalance(user_id, seconds))

    async def get_balance(self, principal: Principal, user_id: uuid.UUID) -> Balance:
        profile = await self._layers.call(principal, fn.GetProfile(user_id))
        return Balance(
            profile.user_id, profile.balance, profile.held, profile.available, profile.update_time
        )

    # DeliveryQueue

    async def dispatch(self, limit: int) -> int:
        return await self._layers.call_as_service(fn.DispatchEvents(limit))

    async def notice_expiring_grants(self, limit: int) -> int:
        return await self._layers.call_as_service(fn.NoticeExpiringGrants(limit))

    async def claim(self, worker: str, limit: int, lease_seconds: int) -> Sequence[ClaimedDelivery]:
        return await self._layers.call_as_service(fn.ClaimDeliveries(worker, limit, lease_seconds))

    async def finish(
        self,
        delivery_id: uuid.UUID,
        worker: str,
        *,
        delivered: bool,
        status: int | None,
        error: str,
        retry_seconds: float | None,
    ) -> str | None:
        call = fn.FinishDelivery(delivery_id, worker, delivered, status, error, retry_seconds)
        return await self._layers.call_as_service(call)

    async def stats(self) -> DeliveryStats:
        return await self._layers.call_as_service(fn.GetDeliveryStats())

    # WebhookAdmin

    async def add(self, url: str, event_types: Sequence[str], secret: str) -> Endpoint:
        return await self._layers.call_as_service(fn.AddWebhook(url, list(event_types), secret))

    async def endpoints(self) -> Sequence[Endpoint]:
        return await self._layers.call_as_service(fn.ListWebhooks())

    async def remove(self, endpoint_id: uuid.UUID) -> None:
        await self._layers.call_as_service(fn.RemoveWebhook(endpoint_id))

    async def rotate_secret(self, endpoint_id: uuid.UUID, secret: str) -> Endpoint:
        return await self._layers.call_as_service(fn.RotateWebhookSecret(endpoint_id, secret))

    async def deliveries(self, state: str | None, limit: int) -> Sequence[Delivery]:
        return await self._layers.call_as_service(fn.ListDeliveries(state, limit))

    async def retry(self, delivery_id: uuid.UUID) -> Delivery:
        return await self._layers.call_as_service(fn.RetryDelivery(delivery_id))
