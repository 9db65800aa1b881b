"""Plain values of the credit domain."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class TransactionKind(StrEnum):
    DEBIT = "debit"
    GRANT = "grant"
    REFUND = "refund"
    CAPTURE = "capture"


class HoldState(StrEnum):
    PENDING = "pending"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Profile:
    """A user's credit account; `held` and `available` are counted as of the read."""

    user_id: uuid.UUID
    email: str
    balance: int
    held: int
    available: int
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True, slots=True)
class Transaction:
    """One append-only ledger entry."""

    transaction_id: uuid.UUID
    user_id: uuid.UUID
    kind: TransactionKind
    amount: int
    balance_after: int
    idempotency_key: str
    description: str
    metadata: Mapping[str, str]
    create_time: datetime
    refunded_transaction_id: uuid.UUID | None
    hold_id: uuid.UUID | None
    # Position in the ledger's total order; only paging uses it.
    seq: int


@dataclass(frozen=True, slots=True)
class Movement:
    """A validated request to debit or grant credits."""

    amount: int
    idempotency_key: str
    description: str
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RefundRequest:
    """A validated request to refund (part of) a debit; amount 0 refunds what is left."""

    transaction_id: uuid.UUID
    amount: int
    idempotency_key: str
    description: str


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """A validated request to set credits aside for `ttl_seconds`."""

    amount: int
    idempotency_key: str
    ttl_seconds: int
    description: str


@dataclass(frozen=True, slots=True)
class LedgerResult:
    """What a money movement returns: the entry, the balance after it, and whether it is a
    replay of an earlier call with the same idempotency key."""

    transaction: Transaction
    balance: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class Hold:
    """Credits set aside until captured, released or expired (a pending hold past its
    expire_time is reported expired even before the sweeper marks it)."""

    hold_id: uuid.UUID
    user_id: uuid.UUID
    amount: int
    state: HoldState
    expire_time: datetime
    create_time: datetime
    idempotency_key: str
    description: str


@dataclass(frozen=True, slots=True)
class Reservation:
    """What ReserveCredits returns: the hold and the user's available credits after it."""

    hold: Hold
    available: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class Capture:
    """What CaptureCredits returns: the CAPTURE entry and the hold it settled."""

    transaction: Transaction
    hold: Hold
    balance: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class Release:
    hold: Hold
    available: int


@dataclass(frozen=True, slots=True)
class TransactionFilter:
    """Which ledger entries a listing shows: kinds (empty: all) created in [start, end)."""

    kinds: frozenset[TransactionKind] = frozenset()
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class CreditCheck:
    sufficient: bool
    available: int
    shortfall: int


@dataclass(frozen=True, slots=True)
class TransactionPage:
    transactions: Sequence[Transaction]
    next_page_token: str
