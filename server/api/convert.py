"""Domain values to protobuf messages (and nothing else)."""

from __future__ import annotations

from datetime import datetime

from credits.v1 import ledger_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from server.credit.models import Profile, Transaction, TransactionKind

_KINDS = {
    TransactionKind.DEBIT: ledger_pb2.TRANSACTION_KIND_DEBIT,
    TransactionKind.GRANT: ledger_pb2.TRANSACTION_KIND_GRANT,
    TransactionKind.REFUND: ledger_pb2.TRANSACTION_KIND_REFUND,
    TransactionKind.CAPTURE: ledger_pb2.TRANSACTION_KIND_CAPTURE,
}


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def profile(value: Profile) -> ledger_pb2.Profile:
    return ledger_pb2.Profile(
        user_id=str(value.user_id),
        email=value.email,
        balance=value.balance,
        held=value.held,
        available=value.available,
        create_time=timestamp(value.create_time),
        update_time=timestamp(value.update_time),
    )


def transaction(value: Transaction) -> ledger_pb2.Transaction:
    return ledger_pb2.Transaction(
        transaction_id=str(value.transaction_id),
        user_id=str(value.user_id),
        kind=_KINDS[value.kind],
        amount=value.amount,
        balance_after=value.balance_after,
        idempotency_key=value.idempotency_key,
        description=value.description,
        metadata=value.metadata,
        create_time=timestamp(value.create_time),
        refunded_transaction_id=str(value.refunded_transaction_id or ""),
        hold_id=str(value.hold_id or ""),
    )
