"""The credit operations of the contract: who may call, what is valid, then the store."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from server.auth.principal import Principal
from server.credit.models import (
    Capture,
    CreditCheck,
    HoldRequest,
    LedgerResult,
    Movement,
    Profile,
    RefundRequest,
    Release,
    Reservation,
    Transaction,
    TransactionFilter,
    TransactionPage,
)
from server.credit.ports import CreditStore
from server.domain import access, paging, validation
from server.domain.paging import PageTokens

# A transaction's fields besides its texts in a response (ids, numbers, a timestamp, framing):
# about 250 bytes at most.
TRANSACTION_OVERHEAD_BYTES = 512


class CreditLedger:
    def __init__(
        self,
        store: CreditStore,
        page_tokens: PageTokens | None = None,
        *,
        max_page_bytes: int = paging.DEFAULT_MAX_PAGE_BYTES,
    ) -> None:
        """`page_tokens` signs the listing's page tokens (None: a key of this process only);
        a page's transactions take at most `max_page_bytes` of its response."""
        self._store = store
        self._pages = page_tokens or PageTokens.ephemeral()
        self._max_page_bytes = max_page_bytes

    async def get_profile(self, principal: Principal, user_id: str) -> Profile:
        return await self._store.get_profile(principal, access.target_user(principal, user_id))

    async def check(self, principal: Principal, user_id: str, amount: int) -> CreditCheck:
        target = access.target_user(principal, user_id)
        validation.positive_amount(amount)
        profile = await self._store.get_profile(principal, target)
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
        movement = _movement(amount, idempotency_key, description, metadata)
        return await self._store.debit(principal, target, movement)

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
        movement = _movement(amount, idempotency_key, description, metadata)
        return await self._store.grant(principal, target, movement)

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
        # The transaction names its user: a service may leave user_id empty.
        target = access.target_user_or_owner(principal, user_id)
        refund = RefundRequest(
            transaction_id=validation.parse_uuid("transaction_id", transaction_id),
            amount=validation.amount_or_zero(amount, "what is left of the transaction"),
            idempotency_key=validation.idempotency_key(idempotency_key),
            description=validation.description(description),
        )
        return await self._store.refund(principal, target, refund)

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
        hold = HoldRequest(
            amount=validation.positive_amount(amount),
            idempotency_key=validation.idempotency_key(idempotency_key),
            ttl_seconds=validation.hold_ttl_seconds(ttl),
            description=validation.description(description),
        )
        return await self._store.reserve(principal, target, hold)

    async def capture(
        self, principal: Principal, hold_id: str, *, amount: int, idempotency_key: str
    ) -> Capture:
        return await self._store.capture(
            principal,
            validation.parse_uuid("hold_id", hold_id),
            access.owner(principal),
            amount=validation.amount_or_zero(amount, "the whole hold"),
            idempotency_key=validation.idempotency_key(idempotency_key),
        )

    async def release(self, principal: Principal, hold_id: str) -> Release:
        return await self._store.release(
            principal, validation.parse_uuid("hold_id", hold_id), access.owner(principal)
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
        validation.page_size(page_size)  # judged before the time range, as fields come
        validation.time_range(where.start, where.end)
        page, token = await self._pages.read_page(
            lambda limit, before: self._store.list_transactions(
                principal, target, limit, before, where
            ),
            user_id=target,
            scope=paging.listing("transactions", sorted(where.kinds), where.start, where.end),
            page_size=page_size,
            page_token=page_token,
            size_of=listed_bytes,
            max_bytes=self._max_page_bytes,
        )
        return TransactionPage(page, token)


def listed_bytes(transaction: Transaction) -> int:
    """An upper bound of the transaction's size in a ListTransactions response."""
    texts = validation.utf8_size(transaction.idempotency_key, transaction.description)
    return TRANSACTION_OVERHEAD_BYTES + texts + paging.entries_bytes(transaction.metadata)


def _movement(amount: int, key: str, text: str, entries: Mapping[str, str]) -> Movement:
    return Movement(
        validation.positive_amount(amount),
        validation.idempotency_key(key),
        validation.description(text),
        validation.metadata(entries),
    )
