"""The events calls of the contract: ListEvents, SetBalanceAlerts and WatchBalance."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence

from server.auth.principal import Principal
from server.credit.models import Profile
from server.domain import access, paging, validation
from server.errors import InvalidArgument, ServerStopping
from server.events.feed import BalanceFeed
from server.events.models import EVENT_TYPES, Balance, Event
from server.events.ports import EventStore
from server.generation.feed import change_within

DEFAULT_EVENTS_PAGE = 100
MAX_EVENTS_PAGE = 1000
MAX_THRESHOLDS = 10
# An event's fields besides its payload in a response (ids, type, a timestamp, framing).
EVENT_OVERHEAD_BYTES = 256
# How long a watch's registration lasts; it is renewed at every re-read, well before.
WATCH_SECONDS = 60


class Events:
    def __init__(
        self,
        store: EventStore,
        feed: BalanceFeed,
        *,
        max_page_bytes: int = paging.DEFAULT_MAX_PAGE_BYTES,
        recheck_seconds: float = 20.0,
        poll_seconds: float = 0.5,
    ) -> None:
        """Watches re-read every `recheck_seconds` while changes are announced (`feed.live`),
        else every `poll_seconds`."""
        self._store = store
        self._feed = feed
        self._max_page_bytes = max_page_bytes
        self._recheck_seconds = recheck_seconds
        self._poll_seconds = poll_seconds
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """End every open watch (SERVER_STOPPING): the server is stopping."""
        self._stopping.set()

    async def get_profile(self, principal: Principal, user_id: str) -> Profile:
        """The profile with its thresholds (GetProfile)."""
        return await self._store.get_profile(principal, access.target_user(principal, user_id))

    async def list_events(
        self, principal: Principal, after_event_id: str, types: Sequence[str], page_size: int
    ) -> list[Event]:
        """Events after `after_event_id` in commit order; as many as fit one response."""
        access.require_service(principal)
        after = validation.parse_uuid("after_event_id", after_event_id) if after_event_id else None
        unknown = sorted(set(types) - set(EVENT_TYPES))
        if unknown:
            raise InvalidArgument.one("types", f"unknown event type {unknown[0]!r}")
        if page_size < 0:
            raise InvalidArgument.one("page_size", "must not be negative")
        limit = min(page_size or DEFAULT_EVENTS_PAGE, MAX_EVENTS_PAGE)
        events = await self._store.list_events(after, sorted(set(types)) or None, limit)
        page: list[Event] = []
        used = 0
        for event in events:
            used += EVENT_OVERHEAD_BYTES + len(json.dumps(event.payload).encode())
            if page and used > self._max_page_bytes:
                break
            page.append(event)
        return page

    async def set_balance_alerts(
        self, principal: Principal, user_id: str, thresholds: Sequence[int], use_defaults: bool
    ) -> Profile:
        access.require_service(principal)
        target = access.target_user(principal, user_id)
        return await self._store.set_balance_alerts(
            target, None if use_defaults else balance_thresholds(thresholds, use_defaults)
        )

    async def watch_balance(self, principal: Principal, user_id: str) -> AsyncIterator[Balance]:
        """The balance now, then after every change, until the caller goes or the server
        stops (SERVER_STOPPING)."""
        target = access.target_user(principal, user_id)
        if not self._feed.live:
            async for balance in self._poll(principal, target):
                yield balance
            return
        async with self._feed.changes(target) as changes:
            # The first read makes the changes announced; the second, made after the first
            # committed, is what the announced changes are judged against.
            await self._store.watch_balance(principal, target, WATCH_SECONDS)
            read = await self._store.watch_balance(principal, target, WATCH_SECONDS)
            last = read.balance
            yield last
            while True:
                change = await change_within(changes, self._stopping, self._recheck_seconds)
                if change is None:
                    # Renew the watch; send what a lost announcement would have.
                    read = await self._store.watch_balance(principal, target, WATCH_SECONDS)
                    if _differs(read.balance, last):
                        last = read.balance
                        yield last
                    continue
                if read.snapshot.sees(change.xid):
                    continue  # already in what the read sent
                last = change.balance
                yield last

    async def _poll(self, principal: Principal, target: uuid.UUID) -> AsyncIterator[Balance]:
        last = await self._store.get_balance(principal, target)
        yield last
        while True:
            try:
                async with asyncio.timeout(self._poll_seconds):
                    await self._stopping.wait()
                raise ServerStopping()
            except TimeoutError:
                pass
            latest = await self._store.get_balance(principal, target)
            if _differs(latest, last):
                last = latest
                yield last


def _differs(a: Balance, b: Balance) -> bool:
    return (a.balance, a.held) != (b.balance, b.held)


def balance_thresholds(thresholds: Sequence[int], use_defaults: bool = False) -> list[int]:
    """`thresholds` ascending without repeats, if they are valid ones."""
    if use_defaults and thresholds:
        raise InvalidArgument.one("thresholds", "must be empty with use_defaults")
    if len(set(thresholds)) > MAX_THRESHOLDS:
        raise InvalidArgument.one("thresholds", f"at most {MAX_THRESHOLDS}")
    if any(t <= 0 for t in thresholds):
        raise InvalidArgument.one("thresholds", "each must be above 0")
    return sorted(set(thresholds))
