"""Decoding the SQL functions' JSON results into domain values."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from server.credit.models import (
    Capture,
    Hold,
    HoldState,
    LedgerResult,
    Profile,
    Release,
    Reservation,
    Transaction,
    TransactionKind,
)
from server.generation.models import Generation, GenerationState


def _uuid_or_none(value: Any) -> uuid.UUID | None:
    return uuid.UUID(value) if value else None


def profile(row: Mapping[str, Any]) -> Profile:
    return Profile(
        user_id=uuid.UUID(row["user_id"]),
        email=row["email"],
        balance=row["balance"],
        held=row["held"],
        available=row["available"],
        create_time=datetime.fromisoformat(row["create_time"]),
        update_time=datetime.fromisoformat(row["update_time"]),
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
