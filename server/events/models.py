"""What the events domain reads and writes."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# The event types of the contract (docs/api-contract.md, docs/events.md).
EVENT_TYPES = (
    "transaction.created",
    "balance.low",
    "balance.depleted",
    "balance.recovered",
    "grant.expiring",
    "grant.expired",
    "generation.succeeded",
    "generation.failed",
    "generation.cancelled",
)


@dataclass(frozen=True, slots=True)
class Event:
    """One event; `payload` is the JSON object the webhooks and ListEvents carry."""

    event_id: uuid.UUID
    type: str
    user_id: uuid.UUID
    create_time: datetime
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Balance:
    """A user's balance at one change (or read)."""

    user_id: uuid.UUID
    balance: int
    held: int
    available: int
    update_time: datetime


@dataclass(frozen=True, slots=True)
class BalanceChange:
    """A committed change of a user's balance, as announced: `xid` is the transaction that
    made it."""

    balance: Balance
    xid: int


@dataclass(frozen=True, slots=True)
class BalanceRead:
    """The balance read for a watch, and the snapshot it was read in."""

    balance: Balance
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A PostgreSQL snapshot (`xmin:xmax:xip,...`): which transactions a read saw."""

    xmin: int
    xmax: int
    running: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, running = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in running.split(",") if x))

    def sees(self, xid: int) -> bool:
        """Whether transaction `xid`'s changes were visible to the read (when committed)."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.running)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A webhook endpoint (its secret is never read back)."""

    endpoint_id: uuid.UUID
    url: str
    event_types: tuple[str, ...]  # empty: every type
    create_time: datetime


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event's delivery to one endpoint."""

    delivery_id: uuid.UUID
    endpoint_id: uuid.UUID
    url: str
    event_id: uuid.UUID
    type: str
    state: str  # pending, delivered, failed
    attempts: int
    next_attempt_time: datetime
    last_status: int | None
    last_error: str
    create_time: datetime
    deliver_time: datetime | None


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery leased to a worker, with what it needs to send it."""

    delivery_id: uuid.UUID
    attempt: int
    url: str
    secret: str
    event: Event

    def __repr__(self) -> str:  # never show the secret
        return f"ClaimedDelivery({self.delivery_id}, attempt={self.attempt}, url={self.url!r})"


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    pending: int
    failed: int
    oldest_pending_seconds: float
