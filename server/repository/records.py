"""Decoding the SQL functions' JSON results into domain values."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from server.credit.models import (
    Allocation,
    Capture,
    Grant,
    GrantCategory,
    GrantResult,
    GrantState,
    Hold,
    HoldState,
    LedgerResult,
    Profile,
    Release,
    Reservation,
    SpendLimit,
    SpendPeriod,
    Transaction,
    TransactionKind,
    UsageBucket,
)
from server.events.models import (
    Balance,
    BalanceRead,
    ClaimedDelivery,
    Delivery,
    Endpoint,
    Event,
    Snapshot,
)
from server.generation.models import Generation, GenerationState


def _uuid_or_none(value: Any) -> uuid.UUID | None:
    return uuid.UUID(value) if value else None


def _time_or_none(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def profile(row: Mapping[str, Any]) -> Profile:
    return Profile(
        user_id=uuid.UUID(row["user_id"]),
        email=row["email"],
        balance=row["balance"],
        held=row["held"],
        available=row["available"],
        create_time=datetime.fromisoformat(row["create_time"]),
        update_time=datetime.fromisoformat(row["update_time"]),
        next_expire_time=_time_or_none(row["next_expire_time"]),
        next_expire_amount=row["next_expire_amount"],
        low_balance_thresholds=tuple(row.get("low_balance_thresholds") or ()),
        low_balance_thresholds_default=row.get("low_balance_thresholds_default", True),
    )


def transaction(row: Mapping[str, Any]) -> Transaction:
    return Transaction(
        transaction_id=uuid.UUID(row["transaction_id"]),
        user_id=uuid.UUID(row["user_id"]),
        kind=TransactionKind(row["kind"]),
        amount=row["amount"],
        balance_after=row["balance_after"],
        idempotency_key=row["idempotency_key"],
        description=row["description"],
        metadata=row["metadata"],
        create_time=datetime.fromisoformat(row["create_time"]),
        refunded_transaction_id=_uuid_or_none(row["refunded_transaction_id"]),
        hold_id=_uuid_or_none(row["hold_id"]),
        seq=row["seq"],
        allocations=tuple(
            Allocation(uuid.UUID(part["grant_id"]), part["amount"])
            for part in row["allocations"] or ()
        ),
        scope=row.get("scope") or "",
    )


def grant(row: Mapping[str, Any]) -> Grant:
    return Grant(
        grant_id=uuid.UUID(row["grant_id"]),
        user_id=uuid.UUID(row["user_id"]),
        amount=row["amount"],
        remaining=row["remaining"],
        category=GrantCategory(row["category"]),
        priority=row["priority"],
        scopes=tuple(row["scopes"] or ()),
        effective_time=datetime.fromisoformat(row["effective_time"]),
        expire_time=_time_or_none(row["expire_time"]),
        state=GrantState(row["state"]),
        transaction_id=_uuid_or_none(row["transaction_id"]),
        create_time=datetime.fromisoformat(row["create_time"]),
        seq=row["seq"],
    )


def grant_result(row: Mapping[str, Any]) -> GrantResult:
    """credit_grant's and credit_void_grant's result (`transaction` null: none written)."""
    entry, made = row["transaction"], row["grant"]
    return GrantResult(
        transaction=transaction(entry) if entry else None,
        grant=grant(made) if made else None,
        balance=row["balance"],
        replayed=row["replayed"],
    )


def ledger_result(row: Mapping[str, Any]) -> LedgerResult:
    return LedgerResult(
        transaction=transaction(row["transaction"]),
        balance=row["balance"],
        replayed=row["replayed"],
    )


def hold(row: Mapping[str, Any]) -> Hold:
    return Hold(
        hold_id=uuid.UUID(row["hold_id"]),
        user_id=uuid.UUID(row["user_id"]),
        amount=row["amount"],
        state=HoldState(row["state"]),
        expire_time=datetime.fromisoformat(row["expire_time"]),
        create_time=datetime.fromisoformat(row["create_time"]),
        idempotency_key=row["idempotency_key"],
        description=row["description"],
    )


def reservation(row: Mapping[str, Any]) -> Reservation:
    return Reservation(hold=hold(row["hold"]), available=row["available"], replayed=row["replayed"])


def capture(row: Mapping[str, Any]) -> Capture:
    return Capture(
        transaction=transaction(row["transaction"]),
        hold=hold(row["hold"]),
        balance=row["balance"],
        replayed=row["replayed"],
    )


def release(row: Mapping[str, Any]) -> Release:
    return Release(hold=hold(row["hold"]), available=row["available"])


def generation(row: Mapping[str, Any]) -> Generation:
    output = row.get("output")
    return Generation(
        generation_id=uuid.UUID(row["generation_id"]),
        user_id=uuid.UUID(row["user_id"]),
        model=row["model"],
        prompt=row["prompt"],
        parameters=row["parameters"],
        state=GenerationState(row["state"]),
        cost=row["cost"],
        hold_id=_uuid_or_none(row["hold_id"]),
        transaction_id=_uuid_or_none(row["transaction_id"]),
        output=base64.b64decode(output) if output else b"",
        output_mime_type=row["output_mime_type"],
        error_message=row["error_message"],
        attempts=row["attempts"],
        create_time=datetime.fromisoformat(row["create_time"]),
        update_time=datetime.fromisoformat(row["update_time"]),
        seq=row["seq"],
    )


def event(row: Mapping[str, Any]) -> Event:
    return Event(
        event_id=uuid.UUID(row["event_id"]),
        type=row["type"],
        user_id=uuid.UUID(row["user_id"]),
        create_time=datetime.fromisoformat(row["create_time"]),
        payload=row["payload"],
    )


def balance(row: Mapping[str, Any]) -> Balance:
    return Balance(
        user_id=uuid.UUID(row["user_id"]),
        balance=row["balance"],
        held=row["held"],
        available=row["available"],
        update_time=datetime.fromisoformat(row["update_time"]),
    )


def balance_read(row: Mapping[str, Any]) -> BalanceRead:
    return BalanceRead(balance(row), Snapshot.parse(row["snapshot"]))


def endpoint(row: Mapping[str, Any]) -> Endpoint:
    return Endpoint(
        endpoint_id=uuid.UUID(row["endpoint_id"]),
        url=row["url"],
        event_types=tuple(row["event_types"]),
        create_time=datetime.fromisoformat(row["create_time"]),
    )


def delivery(row: Mapping[str, Any]) -> Delivery:
    return Delivery(
        delivery_id=uuid.UUID(row["delivery_id"]),
        endpoint_id=uuid.UUID(row["endpoint_id"]),
        url=row["url"],
        event_id=uuid.UUID(row["event_id"]),
        type=row["type"],
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_time=datetime.fromisoformat(row["next_attempt_time"]),
        last_status=row["last_status"],
        last_error=row["last_error"],
        create_time=datetime.fromisoformat(row["create_time"]),
        deliver_time=_time_or_none(row["deliver_time"]),
    )


def claimed_delivery(row: Mapping[str, Any]) -> ClaimedDelivery:
    return ClaimedDelivery(
        delivery_id=uuid.UUID(row["delivery_id"]),
        attempt=row["attempt"],
        url=row["url"],
        secret=row["secret"],
        event=event(row["event"]),
    )


def spend_limits(raw: Mapping[str, Any]) -> list[SpendLimit]:
    return [
        SpendLimit(
            period=SpendPeriod(row["period"]),
            limit=row["limit"],
            spent=row["spent"],
            reset_time=datetime.fromisoformat(row["reset_time"]),
            is_default=row["default"],
        )
        for row in raw["limits"]
    ]


def usage_bucket(row: Mapping[str, Any]) -> UsageBucket:
    return UsageBucket(
        start_time=datetime.fromisoformat(row["start_time"]),
        kind=TransactionKind(row["kind"]) if row["kind"] is not None else None,
        scope=row["scope"],
        category=GrantCategory(row["category"]) if row["category"] is not None else None,
        spent=row["spent"],
        granted=row["granted"],
        refunded=row["refunded"],
        expired=row["expired"],
        voided=row["voided"],
    )
