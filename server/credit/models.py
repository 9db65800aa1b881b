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
    # A grant's unspent remainder leaving the balance at its expire time.
    EXPIRE = "expire"
    # A grant's remainder removed by VoidGrant.
    VOID = "void"


class GrantCategory(StrEnum):
    PAID = "paid"
    PROMOTIONAL = "promotional"


class GrantState(StrEnum):
    """A grant's state as of a read, judged by time (see the contract's Grants section)."""

    PENDING = "pending"
    ACTIVE = "active"
    DEPLETED = "depleted"
    EXPIRED = "expired"
    VOIDED = "voided"


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
    # The soonest expiry among the user's active grants (None: none expires) and how much of
    # the balance goes then.
    next_expire_time: datetime | None = None
    next_expire_amount: int = 0
    # The thresholds balance.low fires at, ascending, and whether they are the defaults (read
    # by GetProfile and SetBalanceAlerts only; empty and True elsewhere).
    low_balance_thresholds: tuple[int, ...] = ()
    low_balance_thresholds_default: bool = True


@dataclass(frozen=True, slots=True)
class Allocation:
    """How much of a ledger entry one grant took or gave."""

    grant_id: uuid.UUID
    amount: int


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
    # The grants it drew on or returned to, in the order they were drawn.
    allocations: tuple[Allocation, ...] = ()
    # What the spending was for (debits, captures, their refunds); "" unscoped or other kinds.
    scope: str = ""


@dataclass(frozen=True, slots=True)
class Grant:
    """A batch of credits a user was given; `state` and `remaining` as of the read."""

    grant_id: uuid.UUID
    user_id: uuid.UUID
    amount: int
    remaining: int
    category: GrantCategory
    priority: int
    scopes: tuple[str, ...]
    effective_time: datetime
    expire_time: datetime | None
    state: GrantState
    # The GRANT entry, once written (None while pending, and for pre-grant balances).
    transaction_id: uuid.UUID | None
    create_time: datetime
    # Position in the user's grants; only paging uses it.
    seq: int


@dataclass(frozen=True, slots=True)
class Movement:
    """A validated request to debit credits (`scope`: what the spending is for; "" unscoped)."""

    amount: int
    idempotency_key: str
    description: str
    metadata: Mapping[str, str]
    scope: str = ""


# A grant's priority when the request names none.
DEFAULT_GRANT_PRIORITY = 50


@dataclass(frozen=True, slots=True)
class GrantRequest:
    """A validated request to give credits: `effective_time` None means now, `expire_time`
    None never; `scopes` sorted and distinct (empty: any spending)."""

    amount: int
    idempotency_key: str
    description: str
    metadata: Mapping[str, str]
    expire_time: datetime | None = None
    effective_time: datetime | None = None
    priority: int = DEFAULT_GRANT_PRIORITY
    category: GrantCategory = GrantCategory.PAID
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VoidRequest:
    """A validated request to void what is left of a grant."""

    grant_id: uuid.UUID
    idempotency_key: str
    description: str


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
    scope: str = ""


@dataclass(frozen=True, slots=True)
class LedgerResult:
    """What a money movement returns: the entry, the balance after it, and whether it is a
    replay of an earlier call with the same idempotency key."""

    transaction: Transaction
    balance: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class GrantResult:
    """What GrantCredits and VoidGrant return: the ledger entry (None when none was written:
    a grant not yet effective, a void with nothing unpinned to remove), the grant as it is
    after the call (None only on a replay of a grant made before grants existed), the balance,
    and whether this is a replay."""

    transaction: Transaction | None
    grant: Grant | None
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


@dataclass(frozen=True, slots=True)
class GrantPage:
    grants: Sequence[Grant]
    next_page_token: str


class SpendPeriod(StrEnum):
    """A calendar period of spending, aligned in UTC (weeks start on Monday)."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class SpendLimit:
    """A limit in force on a user's spending in a period, and what they spent in the current
    one (debits and reservations, less what refunds and released holds gave back)."""

    period: SpendPeriod
    limit: int
    spent: int
    reset_time: datetime
    # The deployment's default (CREDITS_DEFAULT_*_LIMIT), not one set for this user.
    is_default: bool


class UsageGranularity(StrEnum):
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


class UsageGroupBy(StrEnum):
    NONE = "none"
    KIND = "kind"
    SCOPE = "scope"
    CATEGORY = "category"


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """GetUsage's question: the half-open range [start, end) in whole hours, in buckets."""

    start: datetime
    end: datetime
    granularity: UsageGranularity
    group_by: UsageGroupBy


@dataclass(frozen=True, slots=True)
class UsageBucket:
    """What the ledger moved in one period and group (the group's fields are set only when
    grouping by them)."""

    start_time: datetime
    kind: TransactionKind | None
    scope: str | None
    category: GrantCategory | None
    spent: int
    granted: int
    refunded: int
    expired: int
    voided: int


@dataclass(frozen=True, slots=True)
class ExportQuery:
    """Whose ledger to export (None: every user's) and the range of creation times."""

    user_id: uuid.UUID | None
    start: datetime | None
    end: datetime | None


@dataclass(frozen=True, slots=True)
class ExportCursor:
    """Where an export's previous batch ended: its last entry's user and seq."""

    user_id: uuid.UUID
    seq: int
