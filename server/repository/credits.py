"""The credit domain's store (server/credit/ports.py) over the ledger's SQL functions."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from server.auth.principal import Principal, UserPrincipal
from server.credit.models import (
    Capture,
    CreditCheck,
    ExportCursor,
    ExportQuery,
    Grant,
    GrantRequest,
    GrantResult,
    GrantState,
    HoldRequest,
    LedgerResult,
    Movement,
    Profile,
    RefundRequest,
    Release,
    Reservation,
    SpendLimit,
    SpendPeriod,
    Transaction,
    TransactionFilter,
    UsageBucket,
    UsageQuery,
    VoidRequest,
)
from server.observability import metrics
from server.repository import functions as fn
from server.repository.layered import LayeredRepository


class CreditRepository:
    def __init__(self, layers: LayeredRepository) -> None:
        self._layers = layers

    async def configure(self, *, signup_credits: int, signup_ttl_seconds: int | None) -> None:
        """The signup credits (a promotional grant) and how long they last (None: forever)."""
        await self._layers.call_as_service(fn.Configure(signup_credits, signup_ttl_seconds))

    async def configure_limits(
        self, *, daily: int | None, monthly: int | None, max_active_generations: int
    ) -> None:
        """The default spending limits (None: none) and the cap on active generations."""
        await self._layers.call_as_service(
            fn.ConfigureLimits(daily, monthly, max_active_generations)
        )

    async def provision(self, principal: UserPrincipal) -> None:
        await self._layers.call(principal, fn.ProvisionProfile(principal.user_id, principal.email))

    async def provision_known(self, user_id: uuid.UUID) -> None:
        await self._layers.call_as_service(fn.ProvisionKnownUser(user_id))

    async def get_profile(self, principal: Principal, user_id: uuid.UUID) -> Profile:
        return await self._layers.call(principal, fn.GetProfile(user_id))

    async def check(
        self, principal: Principal, user_id: uuid.UUID, amount: int, scope: str
    ) -> CreditCheck:
        return await self._layers.call(principal, fn.Check(user_id, amount, scope))

    async def list_transactions(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        limit: int,
        before_seq: int | None,
        where: TransactionFilter,
    ) -> Sequence[Transaction]:
        kinds = [kind.value for kind in sorted(where.kinds)] or None
        call = fn.ListTransactions(user_id, limit, before_seq, kinds, where.start, where.end)
        return await self._layers.call(principal, call)

    async def debit(
        self, principal: Principal, user_id: uuid.UUID, movement: Movement
    ) -> LedgerResult:
        call = fn.Debit(
            user_id,
            movement.amount,
            movement.idempotency_key,
            movement.description,
            dict(movement.metadata),
            movement.scope,
        )
        return _counted(await self._layers.call(principal, call))

    async def grant(
        self, principal: Principal, user_id: uuid.UUID, grant: GrantRequest
    ) -> GrantResult:
        call = fn.GrantCredits(
            user_id,
            grant.amount,
            grant.idempotency_key,
            grant.description,
            dict(grant.metadata),
            grant.expire_time,
            grant.effective_time,
            grant.priority,
            grant.category.value,
            list(grant.scopes),
        )
        result = await self._layers.call(principal, call)
        metrics.ledger_operation("grant", result.replayed)
        return result

    async def void_grant(self, principal: Principal, void: VoidRequest) -> GrantResult:
        call = fn.VoidGrant(void.grant_id, void.idempotency_key, void.description)
        result = await self._layers.call(principal, call)
        metrics.ledger_operation("void", result.replayed)
        return result

    async def list_grants(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        limit: int,
        before_seq: int | None,
        states: frozenset[GrantState],
    ) -> Sequence[Grant]:
        wanted = [state.value for state in sorted(states)] or None
        return await self._layers.call(principal, fn.ListGrants(user_id, limit, before_seq, wanted))

    async def refund(
        self, principal: Principal, user_id: uuid.UUID | None, refund: RefundRequest
    ) -> LedgerResult:
        call = fn.Refund(
            user_id,
            refund.transaction_id,
            refund.amount,
            refund.idempotency_key,
            refund.description,
        )
        return _counted(await self._layers.call(principal, call))

    async def reserve(
        self, principal: Principal, user_id: uuid.UUID, hold: HoldRequest
    ) -> Reservation:
        call = fn.Reserve(
            user_id,
            hold.amount,
            hold.idempotency_key,
            hold.ttl_seconds,
            hold.description,
            hold.scope,
        )
        reservation = await self._layers.call(principal, call)
        metrics.ledger_operation("reserve", reservation.replayed)
        return reservation

    async def capture(
        self,
        principal: Principal,
        hold_id: uuid.UUID,
        owner: uuid.UUID | None,
        *,
        amount: int,
        idempotency_key: str,
    ) -> Capture:
        call = fn.CaptureHold(hold_id, owner, amount, idempotency_key)
        capture = await self._layers.call(principal, call)
        metrics.ledger_operation("capture", capture.replayed)
        return capture

    async def release(
        self, principal: Principal, hold_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Release:
        release = await self._layers.call(principal, fn.ReleaseHold(hold_id, owner))
        metrics.ledger_operation("release", replayed=False)
        return release

    async def set_spend_limit(
        self, principal: Principal, user_id: uuid.UUID, period: SpendPeriod, limit: int
    ) -> list[SpendLimit]:
        return await self._layers.call(principal, fn.SetSpendLimit(user_id, period.value, limit))

    async def get_spend_limits(self, principal: Principal, user_id: uuid.UUID) -> list[SpendLimit]:
        return await self._layers.call(principal, fn.GetSpendLimits(user_id))

    async def get_usage(
        self, principal: Principal, user_id: uuid.UUID, query: UsageQuery
    ) -> list[UsageBucket]:
        call = fn.GetUsage(
            user_id, query.start, query.end, query.granularity.value, query.group_by.value
        )
        return await self._layers.call(principal, call)

    async def export_transactions(
        self, query: ExportQuery, after: ExportCursor | None, limit: int
    ) -> list[Transaction]:
        call = fn.ExportTransactions(
            query.user_id,
            query.start,
            query.end,
            after.user_id if after else None,
            after.seq if after else None,
            limit,
        )
        return await self._layers.call_as_service(call)

    async def expire_holds(self, users: int) -> int:
        return await self._layers.call_as_service(fn.ExpireHolds(users))

    async def settlement_lag(self) -> float:
        return await self._layers.call_as_service(fn.GetSettlementLag())


def _counted(result: LedgerResult) -> LedgerResult:
    metrics.ledger_operation(result.transaction.kind, result.replayed)
    return result
