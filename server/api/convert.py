"""Domain values to protobuf messages (and nothing else)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import (
    credit_service_pb2,
    event_pb2,
    generation_pb2,
    grant_pb2,
    ledger_pb2,
    usage_pb2,
)
from server.credit.models import (
    Grant,
    GrantCategory,
    GrantResult,
    GrantState,
    Hold,
    HoldState,
    LedgerResult,
    Profile,
    SpendLimit,
    SpendPeriod,
    Transaction,
    TransactionFilter,
    TransactionKind,
    UsageBucket,
    UsageGranularity,
    UsageGroupBy,
)
from server.errors import InvalidArgument
from server.events.models import Event
from server.generation.models import Generation, GenerationState, ModelSpec
from server.generation.parameters import Parameter, ParameterType

_KINDS = {
    TransactionKind.DEBIT: ledger_pb2.TRANSACTION_KIND_DEBIT,
    TransactionKind.GRANT: ledger_pb2.TRANSACTION_KIND_GRANT,
    TransactionKind.REFUND: ledger_pb2.TRANSACTION_KIND_REFUND,
    TransactionKind.CAPTURE: ledger_pb2.TRANSACTION_KIND_CAPTURE,
    TransactionKind.EXPIRE: ledger_pb2.TRANSACTION_KIND_EXPIRE,
    TransactionKind.VOID: ledger_pb2.TRANSACTION_KIND_VOID,
}

_KINDS_BY_NUMBER = {number: kind for kind, number in _KINDS.items()}
_HOLD_STATES = {
    HoldState.PENDING: ledger_pb2.HOLD_STATE_PENDING,
    HoldState.CAPTURED: ledger_pb2.HOLD_STATE_CAPTURED,
    HoldState.RELEASED: ledger_pb2.HOLD_STATE_RELEASED,
    HoldState.EXPIRED: ledger_pb2.HOLD_STATE_EXPIRED,
}

_GRANT_STATES = {
    GrantState.PENDING: grant_pb2.GRANT_STATE_PENDING,
    GrantState.ACTIVE: grant_pb2.GRANT_STATE_ACTIVE,
    GrantState.DEPLETED: grant_pb2.GRANT_STATE_DEPLETED,
    GrantState.EXPIRED: grant_pb2.GRANT_STATE_EXPIRED,
    GrantState.VOIDED: grant_pb2.GRANT_STATE_VOIDED,
}
_GRANT_STATES_BY_NUMBER = {number: state for state, number in _GRANT_STATES.items()}

_GRANT_CATEGORIES = {
    GrantCategory.PAID: grant_pb2.GRANT_CATEGORY_PAID,
    GrantCategory.PROMOTIONAL: grant_pb2.GRANT_CATEGORY_PROMOTIONAL,
}
_GRANT_CATEGORIES_BY_NUMBER = {number: category for category, number in _GRANT_CATEGORIES.items()}

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


# The ranges google/protobuf/timestamp.proto and duration.proto define: 0001-01-01 to
# 9999-12-31 (what datetime holds), and +-10000 years.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
MAX_DURATION_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def timestamp_or_none(value: datetime | None) -> Timestamp | None:
    return timestamp(value) if value is not None else None


def profile(value: Profile) -> ledger_pb2.Profile:
    return ledger_pb2.Profile(
        user_id=str(value.user_id),
        email=value.email,
        balance=value.balance,
        held=value.held,
        available=value.available,
        create_time=timestamp(value.create_time),
        update_time=timestamp(value.update_time),
        next_expire_time=timestamp_or_none(value.next_expire_time),
        next_expire_amount=value.next_expire_amount,
        low_balance_thresholds=value.low_balance_thresholds,
        low_balance_thresholds_default=value.low_balance_thresholds_default,
    )


def event(value: Event) -> event_pb2.Event:
    return event_pb2.Event(
        event_id=str(value.event_id),
        type=value.type,
        user_id=str(value.user_id),
        create_time=timestamp(value.create_time),
        payload=json.dumps(value.payload, separators=(",", ":")),
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
        allocations=[
            ledger_pb2.Allocation(grant_id=str(part.grant_id), amount=part.amount)
            for part in value.allocations
        ],
        scope=value.scope,
    )


def grant(value: Grant) -> grant_pb2.Grant:
    return grant_pb2.Grant(
        grant_id=str(value.grant_id),
        user_id=str(value.user_id),
        amount=value.amount,
        remaining=value.remaining,
        category=_GRANT_CATEGORIES[value.category],
        priority=value.priority,
        scopes=value.scopes,
        effective_time=timestamp(value.effective_time),
        expire_time=timestamp_or_none(value.expire_time),
        state=_GRANT_STATES[value.state],
        transaction_id=str(value.transaction_id or ""),
        create_time=timestamp(value.create_time),
    )


def grant_result(value: GrantResult) -> dict[str, Any]:
    """The fields GrantCreditsResponse and VoidGrantResponse share (`transaction` unset when
    none was written; `grant` unset on a replay of a grant made before grants existed)."""
    entry, made = value.transaction, value.grant
    return {
        "transaction": transaction(entry) if entry is not None else None,
        "grant": grant(made) if made is not None else None,
        "balance": value.balance,
        "replayed": value.replayed,
    }


def grant_category(number: grant_pb2.GrantCategory.ValueType) -> GrantCategory | None:
    """A request's category: None for unspecified (the default), INVALID_ARGUMENT for a
    number the enum does not name."""
    if number == grant_pb2.GRANT_CATEGORY_UNSPECIFIED:
        return None
    category = _GRANT_CATEGORIES_BY_NUMBER.get(number)
    if category is None:
        raise InvalidArgument.one("category", "must be GRANT_CATEGORY_PAID or _PROMOTIONAL")
    return category


def grant_states(numbers: Iterable[grant_pb2.GrantState.ValueType]) -> frozenset[GrantState]:
    """ListGrants' states filter; an unknown or unspecified state is INVALID_ARGUMENT."""
    states = set()
    for number in numbers:
        state = _GRANT_STATES_BY_NUMBER.get(number)
        if state is None:
            raise InvalidArgument.one("states", "must name grant states")
        states.add(state)
    return frozenset(states)


def optional_time(message: Any, field: str) -> datetime | None:
    """The Timestamp field `field` of a request message, or None when it is not set."""
    return time_of(getattr(message, field), field) if message.HasField(field) else None


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
        start=time_of(request.start_time, "start_time") if request.HasField("start_time") else None,
        end=time_of(request.end_time, "end_time") if request.HasField("end_time") else None,
    )


def time_of(value: Timestamp, field: str) -> datetime:
    """A request's Timestamp as a datetime; one outside the range the Timestamp type defines
    (which protobuf cannot convert) is INVALID_ARGUMENT naming `field`."""
    if not MIN_TIMESTAMP_SECONDS <= value.seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidArgument.one(field, "must be a time from year 1 to year 9999")
    if not 0 <= value.nanos <= MAX_NANOS:
        raise InvalidArgument.one(field, f"nanos must be 0 to {MAX_NANOS}")
    return value.ToDatetime(tzinfo=UTC)


def duration_of(value: Duration, field: str) -> timedelta:
    """A request's Duration as a timedelta; one outside the range the Duration type defines, or
    whose seconds and nanos differ in sign, is INVALID_ARGUMENT naming `field`."""
    seconds, nanos = value.seconds, value.nanos
    if not -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
        raise InvalidArgument.one(field, "must be a duration of at most 10000 years")
    if not -MAX_NANOS <= nanos <= MAX_NANOS or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        raise InvalidArgument.one(
            field, f"nanos must be -{MAX_NANOS} to {MAX_NANOS}, of the sign of seconds"
        )
    return value.ToTimedelta()


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


_SPEND_PERIODS = {
    SpendPeriod.DAY: usage_pb2.SPEND_PERIOD_DAY,
    SpendPeriod.WEEK: usage_pb2.SPEND_PERIOD_WEEK,
    SpendPeriod.MONTH: usage_pb2.SPEND_PERIOD_MONTH,
}
_SPEND_PERIODS_BY_NUMBER = {number: period for period, number in _SPEND_PERIODS.items()}
_GRANULARITIES = {
    usage_pb2.USAGE_GRANULARITY_HOUR: UsageGranularity.HOUR,
    usage_pb2.USAGE_GRANULARITY_DAY: UsageGranularity.DAY,
    usage_pb2.USAGE_GRANULARITY_MONTH: UsageGranularity.MONTH,
}
_GROUPINGS = {
    usage_pb2.USAGE_GROUP_BY_UNSPECIFIED: UsageGroupBy.NONE,
    usage_pb2.USAGE_GROUP_BY_NONE: UsageGroupBy.NONE,
    usage_pb2.USAGE_GROUP_BY_KIND: UsageGroupBy.KIND,
    usage_pb2.USAGE_GROUP_BY_SCOPE: UsageGroupBy.SCOPE,
    usage_pb2.USAGE_GROUP_BY_GRANT_CATEGORY: UsageGroupBy.CATEGORY,
}


def spend_period_of(number: int) -> SpendPeriod | None:
    """A request's SpendPeriod; None for an unspecified or unknown one."""
    return _SPEND_PERIODS_BY_NUMBER.get(number)  # type: ignore[call-overload, no-any-return]


def granularity_of(number: int) -> UsageGranularity | None:
    """A request's UsageGranularity; None for an unspecified or unknown one."""
    return _GRANULARITIES.get(number)  # type: ignore[call-overload, no-any-return]


def group_by_of(number: int) -> UsageGroupBy:
    """A request's UsageGroupBy (unspecified: none); an unknown one is INVALID_ARGUMENT."""
    grouping = _GROUPINGS.get(number)  # type: ignore[call-overload]
    if grouping is None:
        raise InvalidArgument.one("group_by", "must be none, kind, scope or grant category")
    return grouping  # type: ignore[no-any-return]


def spend_limit(value: SpendLimit) -> usage_pb2.SpendLimit:
    return usage_pb2.SpendLimit(
        period=_SPEND_PERIODS[value.period],
        limit=value.limit,
        spent=value.spent,
        reset_time=timestamp(value.reset_time),
        is_default=value.is_default,
    )


def usage_bucket(value: UsageBucket) -> usage_pb2.UsageBucket:
    bucket = usage_pb2.UsageBucket(
        start_time=timestamp(value.start_time),
        spent=value.spent,
        granted=value.granted,
        refunded=value.refunded,
        expired=value.expired,
        voided=value.voided,
    )
    # Only the field of the group asked for is set.
    if value.kind is not None:
        bucket.kind = _KINDS[value.kind]
    if value.scope is not None:
        bucket.scope = value.scope
    if value.category is not None:
        bucket.category = _GRANT_CATEGORIES[value.category]
    return bucket
