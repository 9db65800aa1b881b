"""The events domain's rules without a database: snapshots, the retry schedule, thresholds,
signatures, the settings, and WatchBalance over an in-memory store and feed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook

from server.auth.principal import Principal, ServicePrincipal
from server.config import Settings
from server.credit.models import Profile
from server.errors import InvalidArgument, ServerStopping
from server.events.feed import BalanceFeed
from server.events.models import Balance, BalanceChange, BalanceRead, Event, Snapshot
from server.events.service import Events, balance_thresholds
from server.events.webhooks import DEFAULT_SCHEDULE, body, new_secret, retry_delay, signed_headers

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_a_snapshot_sees_what_committed_before_it() -> None:
    snapshot = Snapshot.parse("100:105:101,103")
    assert snapshot.sees(99)
    assert snapshot.sees(102)
    assert not snapshot.sees(101)
    assert not snapshot.sees(105)
    assert not snapshot.sees(200)
    assert Snapshot.parse("7:7:").running == frozenset()


def test_the_retry_schedule_lasts_about_a_day_with_jitter() -> None:
    assert sum(DEFAULT_SCHEDULE) / 3600 == pytest.approx(27.6, abs=0.1)
    assert retry_delay(1, DEFAULT_SCHEDULE, lambda low, high: high) == pytest.approx(6.0)
    assert retry_delay(2, DEFAULT_SCHEDULE, lambda low, high: low) == pytest.approx(240.0)
    for attempt in range(1, len(DEFAULT_SCHEDULE) + 1):
        delay = retry_delay(attempt, DEFAULT_SCHEDULE)
        assert delay is not None
        assert 0.8 * DEFAULT_SCHEDULE[attempt - 1] <= delay <= 1.2 * DEFAULT_SCHEDULE[attempt - 1]
    assert retry_delay(len(DEFAULT_SCHEDULE) + 1, DEFAULT_SCHEDULE) is None


def test_thresholds_are_kept_ascending_and_checked() -> None:
    assert balance_thresholds([100, 10, 50, 10]) == [10, 50, 100]
    assert balance_thresholds([]) == []
    for bad in ([0], [-5], list(range(1, 12))):
        with pytest.raises(InvalidArgument):
            balance_thresholds(bad)
    with pytest.raises(InvalidArgument):
        balance_thresholds([5], use_defaults=True)


def test_a_delivery_is_signed_per_standard_webhooks() -> None:
    event = Event(uuid.uuid4(), "balance.low", uuid.uuid4(), NOW, {"threshold": 50})
    secret = new_secret()
    content = body(event)
    headers = signed_headers(event, content, secret, datetime.now(UTC))
    assert headers["webhook-id"] == str(event.event_id)
    verified = Webhook(secret).verify(content, headers)
    assert verified["data"] == {"threshold": 50}
    assert verified["type"] == "balance.low"


def test_settings_read_thresholds_and_the_expiry_notice() -> None:
    settings = Settings.from_env(
        {"CREDITS_LOW_BALANCE_THRESHOLDS": "500, 100,500", "CREDITS_EXPIRY_NOTICE": "12h"}
    )
    assert settings.low_balance_thresholds == (100, 500)
    assert settings.expiry_notice_seconds == 12 * 3600
    assert Settings.from_env({}).expiry_notice_seconds == 3 * 86400
    for env in (
        {"CREDITS_LOW_BALANCE_THRESHOLDS": "0"},
        {"CREDITS_LOW_BALANCE_THRESHOLDS": "ten"},
        {"CREDITS_EXPIRY_NOTICE": "400d"},
        {"CREDITS_WEBHOOK_TIMEOUT_SECONDS": "0"},
    ):
        with pytest.raises(ValueError, match=next(iter(env))):
            Settings.from_env(env)


class Store:
    """Balances read for watches: each read returns the next (balance, snapshot)."""

    def __init__(self, reads: list[tuple[int, str]]) -> None:
        self.reads = reads

    async def watch_balance(
        self, principal: Principal, user_id: uuid.UUID, seconds: int
    ) -> BalanceRead:
        balance, snapshot = self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]
        return BalanceRead(_balance(user_id, balance), Snapshot.parse(snapshot))

    async def get_balance(self, principal: Principal, user_id: uuid.UUID) -> Balance:
        return (await self.watch_balance(principal, user_id, 1)).balance

    async def list_events(
        self, after: uuid.UUID | None, types: Sequence[str] | None, limit: int
    ) -> Sequence[Event]:
        raise NotImplementedError

    async def set_balance_alerts(
        self, user_id: uuid.UUID, thresholds: Sequence[int] | None
    ) -> Profile:
        raise NotImplementedError

    async def get_profile(self, principal: Principal, user_id: uuid.UUID) -> Profile:
        raise NotImplementedError


def _balance(user_id: uuid.UUID, balance: int) -> Balance:
    return Balance(user_id, balance, 0, balance, NOW)


async def test_watch_balance_skips_changes_its_read_saw_and_ends_on_stop() -> None:
    user = uuid.uuid4()
    feed = BalanceFeed()
    feed.live = True
    events = Events(Store([(90, "10:12:11"), (90, "10:12:11")]), feed)  # type: ignore[arg-type]
    watch = events.watch_balance(ServicePrincipal(), str(user))
    assert (await anext(watch)).balance == 90
    feed.publish(BalanceChange(_balance(user, 95), 9))  # committed before the read: seen
    feed.publish(BalanceChange(_balance(user, 85), 11))  # running at the read: new
    feed.publish(BalanceChange(_balance(user, 80), 12))
    assert (await anext(watch)).balance == 85
    assert (await anext(watch)).balance == 80
    events.stop()
    with pytest.raises(ServerStopping):
        await asyncio.wait_for(anext(watch), 1)
