"""The credit operations of the contract: who may call, what is valid, then the repository."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import timedelta

from server import paging
from server.auth.principal import Principal, UserPrincipal
from server.credit import access, validation
from server.credit.models import (
    Capture,
    CreditCheck,
    LedgerResult,
    Profile,
    Release,
    Reservation,
    TransactionFilter,
    TransactionPage,
)
from server.repository.credits import CreditRepository


class CreditLedger:
    def __init__(self, repository: CreditRepository) -> None:
        self._repository = repository

    async def get_profile(self, principal: Principal, user_id: str) -> Profile:
        return await self._repository.get_profile(principal, access.target_user(principal, user_id))

    async def check(self, principal: Principal, user_id: str, amount: int) -> CreditCheck:
        target = access.target_user(principal, user_id)
        validation.positive_amount(amount)
        profile = await self._repository.get_profile(principal, target)
        shortfall = max(0, amount - profile.available)
        return CreditCheck(shortfall == 0, profile.available, shortfall)

    async def debit(
        self,
        principal: Principal,
        user_id: str,
        *,
        amount: int,
        idempotency_key: str,
        description: str,
        metadata: Mapping[str, str],
    ) -> LedgerResult:
        target = access.target_user(principal, user_id)
        movement = validation.movement(amount, idempotency_key, description, metadata)
        return await self._repository.debit(principal, target, movement)

    async def grant(
        self,
        principal: Principal,
        user_id: str,
        *,
        amount: int,
        idempotency_key: str,
        description: str,
        metadata: Mapping[str, str],
    ) -> LedgerResult:
        access.require_service(principal)
        target = access.target_user(principal, user_id)
        movement = validation.movement(amount, idempotency_key, description, metadata)
        return await self._repository.grant(principal, target, movement)

    async def refund(
        self,
        principal: Principal,
        user_id: str,
        *,
        transaction_id: str,
        amount: int,
        idempotency_key: str,
        description: str,
    ) -> LedgerResult:
        access.require_service(principal)
        target = access.target_user(principal, user_id)
        return await self._repository.refund(
            principal,
            target,
            transaction_id=validation.parse_uuid("transaction_id", transaction_id),
            amount=validation.amount_or_zero(amount, "what is left of the transaction"),
            idempotency_key=validation.idempotency_key(idempotency_key),
            description=validation.description(description),
        )

    async def reserve(
        self,
        principal: Principal,
        user_id: str,
        *,
        amount: int,
        idempotency_key: str,
        ttl: timedelta | None,
        description: str,
    ) -> Reservation:
        target = access.target_user(principal, user_id)
        return await self._repository.reserve(
            principal,
            target,
            amount=validation.positive_amount(amount),
            idempotency_key=validation.idempotency_key(idempotency_key),
            ttl_seconds=validation.hold_ttl_seconds(ttl),
            description=validation.description(description),
        )

    async def capture(
        self, principal: Principal, hold_id: str, *, amount: int, idempotency_key: str
    ) -> Capture:
        return await self._repository.capture(
            principal,
            validation.parse_uuid("hold_id", hold_id),
            _owner(principal),
            amount=validation.amount_or_zero(amount, "the whole hold"),
            idempotency_key=validation.idempotency_key(idempotency_key),
        )

    async def release(self, principal: Principal, hold_id: str) -> Release:
        return await self._repository.release(
            principal, validation.parse_uuid("hold_id", hold_id), _owner(principal)
        )

    async def list_transactions(
        self,
        principal: Principal,
        user_id: str,
        page_size: int,
        page_token: str,
        where: TransactionFilter | None = None,
    ) -> TransactionPage:
        where = where or TransactionFilter()
        target = access.target_user(principal, user_id)
        limit = validation.page_size(page_size)
        validation.time_range(where.start, where.end)
        scope = paging.listing("transactions", sorted(where.kinds), where.start, where.end)
        before = paging.decode(page_token, target, scope)
        # One extra row tells whether another page follows.
        rows = await self._repository.list_transactions(principal, target, limit + 1, before, where)
        page = rows[:limit]
        more = len(rows) > limit
        token = paging.encode(target, scope, page[-1].seq) if more else ""
        return TransactionPage(page, token)


def _owner(principal: Principal) -> uuid.UUID | None:
    """Whose holds the caller may touch: a user their own, a service anyone's (None)."""
    return principal.user_id if isinstance(principal, UserPrincipal) else None
