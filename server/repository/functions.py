"""The SQL functions of the migrations: the only way the service reads or moves credits.

Each function is declared once, as a frozen dataclass whose fields are its parameters in order
(`p_` + the field's name) and whose `decode` turns the function's JSON result into a typed
value. A missing or misspelled argument is a TypeError where the call is built, never a NULL
in SQL. Both transports call a function by its declared name with named arguments, rendered
from these declarations only, never from input.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeVar, dataclass_transform

from server.credit.models import (
    Capture,
    CreditCheck,
    Grant,
    GrantResult,
    LedgerResult,
    Profile,
    Release,
    Reservation,
    SpendLimit,
    Transaction,
    UsageBucket,
)
from server.events.models import (
    BalanceRead,
    ClaimedDelivery,
    Delivery,
    DeliveryStats,
    Endpoint,
    Event,
)
from server.generation.models import ClaimedJob, Generation, QueueStats
from server.repository import records

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
class SqlCall(Generic[T]):
    """One call of a SQL function. A subclass names the function in its class arguments
    (`function=`, and `batched=` for a batched form) and becomes a frozen dataclass of its
    arguments."""

    function: ClassVar[str] = ""
    # The batched form, taking each parameter as an array (see *_credits_batched_calls.sql).
    batched: ClassVar[str | None] = None
    # Fields whose array parameter in the batched form has another name (field -> name).
    batched_names: ClassVar[Mapping[str, str]] = {}
    # Whether a call waiting for a pooled connection goes before the calls waiting already:
    # the generation queue's, so that the API's load never starves the workers.
    ahead: ClassVar[bool] = False
    # Whether the function only reads: batches of reads commit nothing, so more go at once.
    reads: ClassVar[bool] = False

    def __init_subclass__(
        cls,
        *,
        function: str = "",
        batched: str | None = None,
        batched_names: Mapping[str, str] | None = None,
        ahead: bool = False,
        reads: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if function:
            cls.function, cls.batched, cls.ahead, cls.reads = function, batched, ahead, reads
            cls.batched_names = dict(batched_names or {})
        dataclasses.dataclass(frozen=True)(cls)

    @classmethod
    @functools.cache
    def params(cls) -> tuple[str, ...]:
        """The function's parameter names, in order."""
        return tuple(f"p_{name}" for name in cls._fields())

    @classmethod
    @functools.cache
    def batched_params(cls) -> tuple[str, ...]:
        """The batched form's parameter names, in the order of `params()`."""
        return tuple(f"p_{cls.batched_names.get(name, name)}" for name in cls._fields())

    @classmethod
    @functools.cache
    def _fields(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))  # type: ignore[arg-type]

    def values(self) -> tuple[object, ...]:
        """The arguments, in the order of `params()`."""
        return tuple(map(self.__getattribute__, self._fields()))

    def decode(self, raw: Any) -> T:
        """The function's JSON result as a typed value."""
        raise NotImplementedError


class _NoResult(SqlCall[None]):
    def decode(self, raw: Any) -> None:
        return None


# Configuration (service role)


class Configure(_NoResult, function="credit_configure"):
    signup_credits: int
    signup_ttl_seconds: int | None  # None: signup credits never expire


class ConfigureLimits(_NoResult, function="credit_configure_limits"):
    daily_limit: int | None  # None: no default
    monthly_limit: int | None
    max_active_generations: int


class SyncModels(_NoResult, function="credit_sync_models"):
    models: list[dict[str, object]]


class SchemaVersion(SqlCall[str], function="credit_schema_version"):
    def decode(self, raw: Any) -> str:
        return str(raw or "")


class SchemaVersions(SqlCall[list[str]], function="credit_schema_versions"):
    def decode(self, raw: Any) -> list[str]:
        return [str(version) for version in raw or []]


# Profiles and the ledger


class ProvisionProfile(_NoResult, function="credit_provision_profile"):
    user_id: uuid.UUID
    email: str


class ProvisionKnownUser(_NoResult, function="credit_provision_known_user"):
    user_id: uuid.UUID


class GetProfile(
    SqlCall[Profile],
    function="credit_get_profile",
    batched="credit_get_profile_each",
    reads=True,
):
    user_id: uuid.UUID

    def decode(self, raw: Any) -> Profile:
        return records.profile(raw)


class Check(SqlCall[CreditCheck], function="credit_check"):
    user_id: uuid.UUID
    amount: int
    scope: str

    def decode(self, raw: Any) -> CreditCheck:
        return CreditCheck(raw["sufficient"], raw["available"], raw["shortfall"])


class ListTransactions(SqlCall[list[Transaction]], function="credit_list_transactions"):
    user_id: uuid.UUID
    limit: int
    before_seq: int | None
    kinds: list[str] | None
    start: datetime | None
    end: datetime | None

    def decode(self, raw: Any) -> list[Transaction]:
        return [records.transaction(row) for row in raw]


class _Movement(SqlCall[LedgerResult]):
    def decode(self, raw: Any) -> LedgerResult:
        return records.ledger_result(raw)


class Debit(
    _Movement,
    function="credit_debit",
    batched="credit_debit_each",
    batched_names={"scope": "scopes"},
):
    user_id: uuid.UUID
    amount: int
    idempotency_key: str
    description: str
    metadata: Mapping[str, str]
    scope: str  # "": unscoped


class _GrantChange(SqlCall[GrantResult]):
    def decode(self, raw: Any) -> GrantResult:
        return records.grant_result(raw)


class GrantCredits(_GrantChange, function="credit_grant"):
    user_id: uuid.UUID
    amount: int
    idempotency_key: str
    description: str
    metadata: Mapping[str, str]
    expire_time: datetime | None  # None: never
    effective_time: datetime | None  # None: now
    priority: int
    category: str
    scopes: list[str]


class VoidGrant(_GrantChange, function="credit_void_grant"):
    grant_id: uuid.UUID
    idempotency_key: str
    description: str


class ListGrants(SqlCall[list[Grant]], function="credit_list_grants"):
    user_id: uuid.UUID
    limit: int
    before_seq: int | None
    states: list[str] | None  # None: every state

    def decode(self, raw: Any) -> list[Grant]:
        return [records.grant(row) for row in raw]


class Refund(_Movement, function="credit_refund"):
    user_id: uuid.UUID | None  # None: the transaction's owner
    transaction_id: uuid.UUID
    amount: int
    idempotency_key: str
    description: str


class Reserve(SqlCall[Reservation], function="credit_reserve"):
    user_id: uuid.UUID
    amount: int
    idempotency_key: str
    ttl_seconds: int
    description: str
    scope: str  # "": unscoped

    def decode(self, raw: Any) -> Reservation:
        return records.reservation(raw)


class CaptureHold(SqlCall[Capture], function="credit_capture"):
    hold_id: uuid.UUID
    owner: uuid.UUID | None
    amount: int
    idempotency_key: str

    def decode(self, raw: Any) -> Capture:
        return records.capture(raw)


class ReleaseHold(SqlCall[Release], function="credit_release"):
    hold_id: uuid.UUID
    owner: uuid.UUID | None

    def decode(self, raw: Any) -> Release:
        return records.release(raw)


class ExpireHolds(SqlCall[int], function="credit_expire_holds"):
    users: int

    def decode(self, raw: Any) -> int:
        return int(raw)


class GetSettlementLag(SqlCall[float], function="credit_settlement_lag"):
    def decode(self, raw: Any) -> float:
        return float(raw)


# Spend limits, usage and the export


class _SpendLimits(SqlCall[list[SpendLimit]]):
    def decode(self, raw: Any) -> list[SpendLimit]:
        return records.spend_limits(raw)


class SetSpendLimit(_SpendLimits, function="credit_set_spend_limit"):
    user_id: uuid.UUID
    period: str
    limit: int  # 0: removes the user's own


class GetSpendLimits(_SpendLimits, function="credit_get_spend_limits"):
    user_id: uuid.UUID


class GetUsage(SqlCall[list[UsageBucket]], function="credit_get_usage"):
    user_id: uuid.UUID
    start: datetime
    end: datetime
    granularity: str
    group_by: str

    def decode(self, raw: Any) -> list[UsageBucket]:
        return [records.usage_bucket(row) for row in raw]


class ExportTransactions(SqlCall[list[Transaction]], function="credit_export_transactions"):
    user_id: uuid.UUID | None  # None: every user
    start: datetime | None
    end: datetime | None
    after_user: uuid.UUID | None
    after_seq: int | None
    limit: int

    def decode(self, raw: Any) -> list[Transaction]:
        return [records.transaction(row) for row in raw]


# Generations


class _OneGeneration(SqlCall[Generation]):
    def decode(self, raw: Any) -> Generation:
        return records.generation(raw)


class CreateGeneration(SqlCall[Generation], function="credit_create_generation"):
    user_id: uuid.UUID
    model: str
    prompt: str
    parameters: Mapping[str, str]
    request_id: str

    def decode(self, raw: Any) -> Generation:
        return records.generation(raw["generation"])


class CreateTracedGeneration(CreateGeneration, function="credit_create_generation_traced"):
    """CreateGeneration, keeping the caller's trace context with the job (docs/tracing.md)."""

    traceparent: str


class GenerationTraceparent(SqlCall[str | None], function="credit_generation_traceparent"):
    generation_id: uuid.UUID

    def decode(self, raw: Any) -> str | None:
        return str(raw) if raw else None


class GetGeneration(_OneGeneration, function="credit_get_generation"):
    generation_id: uuid.UUID
    owner: uuid.UUID | None


class ListGenerations(SqlCall[list[Generation]], function="credit_list_generations"):
    user_id: uuid.UUID
    limit: int
    before_seq: int | None

    def decode(self, raw: Any) -> list[Generation]:
        return [records.generation(row) for row in raw]


class CancelGeneration(_OneGeneration, function="credit_cancel_generation"):
    generation_id: uuid.UUID
    owner: uuid.UUID | None


class GetQueueStats(SqlCall[QueueStats], function="credit_queue_stats"):
    def decode(self, raw: Any) -> QueueStats:
        return QueueStats(raw["queued"], raw["running"], float(raw["oldest_queued_seconds"]))


# The workers' side (service role)


def _claimed_job(raw: Any) -> ClaimedJob:
    return ClaimedJob(
        generation_id=uuid.UUID(raw["generation_id"]),
        model=raw["model"],
        prompt=raw["prompt"],
        parameters=raw["parameters"],
        attempt=raw["attempt"],
    )


class ClaimGenerations(
    SqlCall[dict[str, ClaimedJob]], function="credit_claim_generations", ahead=True
):
    """Up to one job for each of `workers`, in one transaction: the jobs by worker name."""

    workers: list[str]
    lease_seconds: int

    def decode(self, raw: Any) -> dict[str, ClaimedJob]:
        return {job["worker"]: _claimed_job(job) for job in raw or []}


class RenewGenerationLease(SqlCall[bool], function="credit_renew_generation_lease", ahead=True):
    generation_id: uuid.UUID
    worker: str
    lease_seconds: int

    def decode(self, raw: Any) -> bool:
        return bool(raw)


class CompleteGeneration(SqlCall[bool], function="credit_complete_generation", ahead=True):
    generation_id: uuid.UUID
    worker: str
    output: str  # base64: the function takes the bytes as text
    output_mime_type: str

    @classmethod
    def of(
        cls, generation_id: uuid.UUID, worker: str, output: bytes, mime_type: str
    ) -> CompleteGeneration:
        return cls(generation_id, worker, base64.b64encode(output).decode(), mime_type)

    def decode(self, raw: Any) -> bool:
        """Whether the generation was charged (False: its result was discarded)."""
        return bool(raw["charged"])


class CompleteGenerations(
    SqlCall[list[dict[str, Any]]], function="credit_complete_generations", ahead=True
):
    """Several CompleteGeneration in one transaction (`jobs`: their arguments by name, the
    output in base64): per job, `{"charged": bool}` or the error it raised."""

    jobs: list[dict[str, str]]

    def decode(self, raw: Any) -> list[dict[str, Any]]:
        return list(raw)


class FailGeneration(_OneGeneration, function="credit_fail_generation", ahead=True):
    generation_id: uuid.UUID
    worker: str
    error: str
    retryable: bool
    retry_delay_seconds: int


# Events (issue 19)


class ConfigureEvents(_NoResult, function="credit_configure_events"):
    low_balance_thresholds: list[int]
    expiry_notice_seconds: int


class GetProfileAlerts(SqlCall[Profile], function="credit_get_profile_alerts"):
    user_id: uuid.UUID

    def decode(self, raw: Any) -> Profile:
        return records.profile(raw)


class SetBalanceAlerts(SqlCall[Profile], function="credit_set_balance_alerts"):
    user_id: uuid.UUID
    thresholds: list[int] | None  # None: the defaults

    def decode(self, raw: Any) -> Profile:
        return records.profile(raw)


class WatchBalance(SqlCall[BalanceRead], function="credit_watch_balance"):
    user_id: uuid.UUID
    seconds: int

    def decode(self, raw: Any) -> BalanceRead:
        return records.balance_read(raw)


class ListEvents(SqlCall[list[Event]], function="credit_list_events"):
    after_event_id: uuid.UUID | None
    types: list[str] | None  # None: every type
    limit: int

    def decode(self, raw: Any) -> list[Event]:
        return [records.event(row) for row in raw]


class NoticeExpiringGrants(SqlCall[int], function="credit_notice_expiring_grants"):
    limit: int

    def decode(self, raw: Any) -> int:
        return int(raw)


class AddWebhook(SqlCall[Endpoint], function="credit_add_webhook"):
    url: str
    event_types: list[str]
    secret: str

    def decode(self, raw: Any) -> Endpoint:
        return records.endpoint(raw)

    def __repr__(self) -> str:  # never show the secret
        return f"AddWebhook(url={self.url!r}, event_types={self.event_types!r})"


class ListWebhooks(SqlCall[list[Endpoint]], function="credit_list_webhooks"):
    def decode(self, raw: Any) -> list[Endpoint]:
        return [records.endpoint(row) for row in raw]


class RemoveWebhook(_NoResult, function="credit_remove_webhook"):
    endpoint_id: uuid.UUID


class RotateWebhookSecret(SqlCall[Endpoint], function="credit_rotate_webhook_secret"):
    endpoint_id: uuid.UUID
    secret: str

    def decode(self, raw: Any) -> Endpoint:
        return records.endpoint(raw)

    def __repr__(self) -> str:  # never show the secret
        return f"RotateWebhookSecret(endpoint_id={self.endpoint_id})"


class DispatchEvents(SqlCall[int], function="credit_dispatch_events"):
    limit: int

    def decode(self, raw: Any) -> int:
        return int(raw)


class ClaimDeliveries(SqlCall[list[ClaimedDelivery]], function="credit_claim_deliveries"):
    worker: str
    limit: int
    lease_seconds: int

    def decode(self, raw: Any) -> list[ClaimedDelivery]:
        return [records.claimed_delivery(row) for row in raw]


class FinishDelivery(SqlCall[str | None], function="credit_finish_delivery"):
    delivery_id: uuid.UUID
    worker: str
    delivered: bool
    status: int | None
    error: str
    retry_seconds: float | None  # None: give up

    def decode(self, raw: Any) -> str | None:
        return str(raw) if raw else None


class ListDeliveries(SqlCall[list[Delivery]], function="credit_list_deliveries"):
    state: str | None  # None: any
    limit: int

    def decode(self, raw: Any) -> list[Delivery]:
        return [records.delivery(row) for row in raw]


class RetryDelivery(SqlCall[Delivery], function="credit_retry_delivery"):
    delivery_id: uuid.UUID

    def decode(self, raw: Any) -> Delivery:
        return records.delivery(raw)


class GetDeliveryStats(SqlCall[DeliveryStats], function="credit_delivery_stats"):
    def decode(self, raw: Any) -> DeliveryStats:
        return DeliveryStats(raw["pending"], raw["failed"], float(raw["oldest_pending_seconds"]))
