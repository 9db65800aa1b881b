"""Request messages built from keyword arguments, shared by both clients.

Mutations get a fresh UUID as idempotency key (``request_id`` for generations) when the caller
gives none: the key travels inside the request, so gRPC's retries of that request resend the same
key and the service applies it once.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable, Mapping

from google.protobuf import duration_pb2, timestamp_pb2

from credits_client._proto import credit_service_pb2 as cpb
from credits_client._proto import generation_service_pb2 as gpb
from credits_client._proto import grant_pb2, ledger_pb2, usage_pb2

Seconds = float | datetime.timedelta


def new_key() -> str:
    """A fresh idempotency key."""
    return str(uuid.uuid4())


def _key(value: str | None) -> str:
    return new_key() if value is None else value


def _duration(value: Seconds | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    duration = duration_pb2.Duration()
    if isinstance(value, datetime.timedelta):
        duration.FromTimedelta(value)
    else:
        duration.FromTimedelta(datetime.timedelta(seconds=value))
    return duration


def _timestamp(value: datetime.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def get_balance(user_id: str) -> cpb.GetBalanceRequest:
    return cpb.GetBalanceRequest(user_id=user_id)


def get_profile(user_id: str) -> cpb.GetProfileRequest:
    return cpb.GetProfileRequest(user_id=user_id)


def check_credits(user_id: str, amount: int, scope: str = "") -> cpb.CheckCreditsRequest:
    return cpb.CheckCreditsRequest(user_id=user_id, amount=amount, scope=scope)


def debit_credits(
    user_id: str,
    amount: int,
    idempotency_key: str | None,
    description: str,
    metadata: Mapping[str, str] | None,
    scope: str = "",
) -> cpb.DebitCreditsRequest:
    return cpb.DebitCreditsRequest(
        user_id=user_id,
        amount=amount,
        idempotency_key=_key(idempotency_key),
        description=description,
        metadata=dict(metadata or {}),
        scope=scope,
    )


def grant_credits(
    user_id: str,
    amount: int,
    idempotency_key: str | None,
    description: str,
    metadata: Mapping[str, str] | None,
    *,
    expire_time: datetime.datetime | None = None,
    effective_time: datetime.datetime | None = None,
    priority: int | None = None,
    category: grant_pb2.GrantCategory.ValueType = grant_pb2.GRANT_CATEGORY_UNSPECIFIED,
    scopes: Iterable[str] = (),
) -> cpb.GrantCreditsRequest:
    return cpb.GrantCreditsRequest(
        user_id=user_id,
        amount=amount,
        idempotency_key=_key(idempotency_key),
        description=description,
        metadata=dict(metadata or {}),
        expire_time=_timestamp(expire_time),
        effective_time=_timestamp(effective_time),
        priority=priority,
        category=category,
        scopes=list(scopes),
    )


def void_grant(
    grant_id: str, idempotency_key: str | None, description: str
) -> cpb.VoidGrantRequest:
    return cpb.VoidGrantRequest(
        grant_id=grant_id, idempotency_key=_key(idempotency_key), description=description
    )


def list_grants(
    user_id: str,
    page_size: int,
    page_token: str,
    states: Iterable[grant_pb2.GrantState.ValueType],
) -> cpb.ListGrantsRequest:
    return cpb.ListGrantsRequest(
        user_id=user_id, page_size=page_size, page_token=page_token, states=list(states)
    )


def refund_credits(
    user_id: str, transaction_id: str, amount: int, idempotency_key: str | None, description: str
) -> cpb.RefundCreditsRequest:
    return cpb.RefundCreditsRequest(
        user_id=user_id,
        transaction_id=transaction_id,
        amount=amount,
        idempotency_key=_key(idempotency_key),
        description=description,
    )


def reserve_credits(
    user_id: str,
    amount: int,
    idempotency_key: str | None,
    ttl: Seconds | None,
    description: str,
    scope: str = "",
) -> cpb.ReserveCreditsRequest:
    return cpb.ReserveCreditsRequest(
        user_id=user_id,
        amount=amount,
        idempotency_key=_key(idempotency_key),
        ttl=_duration(ttl),
        description=description,
        scope=scope,
    )


def capture_credits(
    hold_id: str, amount: int, idempotency_key: str | None
) -> cpb.CaptureCreditsRequest:
    return cpb.CaptureCreditsRequest(
        hold_id=hold_id, amount=amount, idempotency_key=_key(idempotency_key)
    )


def release_credits(hold_id: str) -> cpb.ReleaseCreditsRequest:
    return cpb.ReleaseCreditsRequest(hold_id=hold_id)


def list_transactions(
    user_id: str,
    page_size: int,
    page_token: str,
    kinds: Iterable[ledger_pb2.TransactionKind.ValueType],
    start_time: datetime.datetime | None,
    end_time: datetime.datetime | None,
) -> cpb.ListTransactionsRequest:
    return cpb.ListTransactionsRequest(
        user_id=user_id,
        page_size=page_size,
        page_token=page_token,
        kinds=list(kinds),
        start_time=_timestamp(start_time),
        end_time=_timestamp(end_time),
    )


def set_spend_limit(
    user_id: str, period: usage_pb2.SpendPeriod.ValueType, limit: int
) -> cpb.SetSpendLimitRequest:
    return cpb.SetSpendLimitRequest(user_id=user_id, period=period, limit=limit)


def get_spend_limits(user_id: str) -> cpb.GetSpendLimitsRequest:
    return cpb.GetSpendLimitsRequest(user_id=user_id)


def get_usage(
    user_id: str,
    start_time: datetime.datetime,
    end_time: datetime.datetime,
    granularity: usage_pb2.UsageGranularity.ValueType,
    group_by: usage_pb2.UsageGroupBy.ValueType,
) -> cpb.GetUsageRequest:
    return cpb.GetUsageRequest(
        user_id=user_id,
        start_time=_timestamp(start_time),
        end_time=_timestamp(end_time),
        granularity=granularity,
        group_by=group_by,
    )


def export_transactions(
    user_id: str,
    all_users: bool,
    start_time: datetime.datetime | None,
    end_time: datetime.datetime | None,
) -> cpb.ExportTransactionsRequest:
    return cpb.ExportTransactionsRequest(
        user_id=user_id,
        all_users=all_users,
        start_time=_timestamp(start_time),
        end_time=_timestamp(end_time),
    )


def list_models() -> gpb.ListModelsRequest:
    return gpb.ListModelsRequest()


def create_generation(
    user_id: str,
    model: str,
    prompt: str,
    parameters: Mapping[str, str] | None,
    request_id: str | None,
) -> gpb.CreateGenerationRequest:
    return gpb.CreateGenerationRequest(
        user_id=user_id,
        model=model,
        prompt=prompt,
        parameters=dict(parameters or {}),
        request_id=_key(request_id),
    )


def get_generation(generation_id: str) -> gpb.GetGenerationRequest:
    return gpb.GetGenerationRequest(generation_id=generation_id)


def list_generations(user_id: str, page_size: int, page_token: str) -> gpb.ListGenerationsRequest:
    return gpb.ListGenerationsRequest(user_id=user_id, page_size=page_size, page_token=page_token)


def cancel_generation(generation_id: str) -> gpb.CancelGenerationRequest:
    return gpb.CancelGenerationRequest(generation_id=generation_id)


def watch_generation(generation_id: str) -> gpb.WatchGenerationRequest:
    return gpb.WatchGenerationRequest(generation_id=generation_id)


def set_balance_alerts(
    user_id: str, thresholds: Iterable[int] | None
) -> cpb.SetBalanceAlertsRequest:
    if thresholds is None:
        return cpb.SetBalanceAlertsRequest(user_id=user_id, use_defaults=True)
    return cpb.SetBalanceAlertsRequest(user_id=user_id, thresholds=list(thresholds))


def list_events(after_event_id: str, types: Iterable[str], page_size: int) -> cpb.ListEventsRequest:
    return cpb.ListEventsRequest(
        after_event_id=after_event_id, types=list(types), page_size=page_size
    )


def watch_balance(user_id: str) -> cpb.WatchBalanceRequest:
    return cpb.WatchBalanceRequest(user_id=user_id)
