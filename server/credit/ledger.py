"""The credit operations of the contract: who may call, what is valid, then the repository."""

from __future__ import annotations

from collections.abc import Mapping

from server.auth.principal import Principal
from server.credit import access, paging, validation
from server.credit.models import CreditCheck, LedgerResult, Profile, TransactionPage
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
        return await self._repository.debit(
            principal,
            target,
            amount=validation.positive_amount(amount),
            idempotency_key=validation.idempotency_key(idempotency_key),
            description=validation.description(description),
            metadata=validation.metadata(metadata),
        )

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
        return await self._repository.grant(
            principal,
            target,
            amount=validation.positive_amount(amount),
            idempotency_key=validation.idempotency_key(idempotency_key),
            description=validation.description(description),
            metadata=validation.metadata(metadata),
        )

    async def list_transactions(
        self, principal: Principal, user_id: str, page_size: int, page_token: str
    ) -> TransactionPage:
        target = access.target_user(principal, user_id)
        limit = validation.page_size(page_size)
        before = paging.decode(page_token, target)
        # One extra row tells whether another page follows.
        rows = await self._repository.list_transactions(principal, target, limit + 1, before)
        page = rows[:limit]
        more = len(rows) > limit
        token = paging.encode(target, page[-1].seq) if more else ""
        return TransactionPage(page, token)
