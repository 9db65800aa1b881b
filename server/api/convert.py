"""Domain values to protobuf messages (and nothing else)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import credit_service_pb2, generation_pb2, ledger_pb2
from server.credit.models import (
    Hold,
    HoldState,
    LedgerResult,
    Profile,
    Transaction,
    TransactionFilter,
    TransactionKind,
)
from server.errors import InvalidArgument
from server.generation.models import Generation, GenerationState, ModelSpec
from server.generation.parameters import Parameter, ParameterType

_KINDS = {
    TransactionKind.DEBIT: ledger_pb2.TRANSACTION_KIND_DEBIT,
    TransactionKind.GRANT: ledger_pb2.TRANSACTION_KIND_GRANT,
    TransactionKind.REFUND: ledger_pb2.TRANSACTION_KIND_REFUND,
    TransactionKind.CAPTURE: ledger_pb2.TRANSACTION_KIND_CAPTURE,
}

_KINDS_BY_NUMBER = {number: kind for kind, number in _KINDS.items()}
_HOLD_STATES = {
    HoldState.PENDING: ledger_pb2.HOLD_STATE_PENDING,
    HoldState.CAPTURED: ledger_pb2.HOLD_STATE_CAPTURED,
    HoldState.RELEASED: ledger_pb2.HOLD_STATE_RELEASED,
    HoldState.EXPIRED: ledger_pb2.HOLD_STATE_EXPIRED,
}

_GENERATION_STATES = {
    GenerationState.QUEUED: generation_pb2.GENERATION_STATE_QUEUED,
    GenerationState.RUNNING: generation_pb2.GENERATION_STATE_RUNNING,
    GenerationState.SUCCEEDED: generation_pb2.GENERATION_STATE_SUCCEEDED,
    GenerationState.FAILED: generation_pb2.GENERATION_STATE_FAILED,
    GenerationState.CANCELLED: generation_pb2.GENERATION_STATE_CANCELLED,
}


_PARAMETER_TYPES = {
    ParameterType.STRING: generation_pb2.PARAMETER_TYPE_STRING,
    ParameterType.INTEGER: generation_pb2.PARAMETER_TYPE_INTEGER,
    ParameterType.ENUM: generation_pb2.PARAMETER_TYPE_ENUM,
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


def ledger_result(value: LedgerResult) -> dict[str, Any]:
    """The fields every money-moving response shares (Debit, Grant, Refund)."""
    return {
        "transaction": transaction(value.transaction),
        "balance": value.balance,
        "replayed": value.replayed,
    }


def hold(value: Hold) -> ledger_pb2.Hold:
    return ledger_pb2.Hold(
        hold_id=str(value.hold_id),
        user_id=str(value.user_id),
        amount=value.amount,
        state=_HOLD_STATES[value.state],
        expire_time=timestamp(value.expire_time),
        create_time=timestamp(value.create_time),
        idempotency_key=value.idempotency_key,
        description=value.description,
    )


def transaction_filter(request: credit_service_pb2.ListTransactionsRequest) -> TransactionFilter:
    """The listing's filter; an unknown or unspecified kind is INVALID_ARGUMENT."""
    kinds = set()
    for number in request.kinds:
        kind = _KINDS_BY_NUMBER.get(number)
        if kind is None:
            raise InvalidArgument.one("kinds", "must name transaction kinds")
        kinds.add(kind)
    return TransactionFilter(
        kinds=frozenset(kinds),
        start=request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time") else None,
        end=request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else None,
    )


def generation(value: Generation) -> generation_pb2.Generation:
    return generation_pb2.Generation(
        generation_id=str(value.generation_id),
        user_id=str(value.user_id),
        model=value.model,
        prompt=value.prompt,
        parameters=value.parameters,
        state=_GENERATION_STATES[value.state],
        cost=value.cost,
        hold_id=str(value.hold_id or ""),
        transaction_id=str(value.transaction_id or ""),
        output=value.output,
        output_mime_type=value.output_mime_type,
        error_message=value.error_message,
        attempts=value.attempts,
        create_time=timestamp(value.create_time),
        update_time=timestamp(value.update_time),
    )


def model(value: ModelSpec) -> generation_pb2.Model:
    return generation_pb2.Model(
        model=value.model,
        cost=value.cost,
        description=value.description,
        parameters=[model_parameter(p) for p in value.parameters or ()],
        accepts_any_parameters=value.parameters is None,
    )


def model_parameter(value: Parameter) -> generation_pb2.ModelParameter:
    return generation_pb2.ModelParameter(
        name=value.name,
        type=_PARAMETER_TYPES[value.type],
        description=value.description,
        required=value.required,
        allowed_values=value.allowed_values,
        minimum=value.minimum,
        maximum=value.maximum,
        pattern=value.pattern,
    )
