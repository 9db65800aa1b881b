"""The credit operations of the contract: who may call, what is valid, then the store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from server.auth.principal import Principal
from server.credit.models import (
    DEFAULT_GRANT_PRIORITY,
    Capture,
    CreditCheck,
    Grant,
    GrantCategory,
    GrantPage,
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
    Transaction,
    TransactionFilter,
    TransactionPage,
    VoidRequest,
)
from server.credit.ports import CreditStore
from server.domain import access, paging, validation
from server.domain.paging import PageTokens

# A transaction's fields besides its texts in a response (ids, numbers, a timestamp, framing):
# about 250 bytes at most.
TRANSACTION_OVERHEAD_BYTES = 512
# A transaction's allocation in a response: a grant id and an amount, with framing.
ALLOCATION_BYTES = 64
# A grant's fields besides its scopes (ids, numbers, timestamps, framing): about 200 bytes.
GRANT_OVERHEAD_BYTES = 512
# A scope's framing in a response (its tag and length).
SCOPE_FRAMING_BYTES = 4


class CreditLedger:
    def __init__(
        self,
        store: CreditStore,
        page_tokens: PageTokens | None = None,
        *,
        max_page_bytes: int = paging.DEFAULT_MAX_PAGE_BYTES,
    ) -> None:
        """`page_tokens` signs the listings' page tokens (None: a key of this process only);
        a page's rows take at most `max_page_bytes` of its response."""
        self._store = store
        self._pages = page_tokens or PageTokens.ephemeral()
        self._max_page_bytes = max_page_bytes

    async def get_profile(self, principal: Principal, user_id: str) -> Profile:
        return await self._store.get_profile(principal, access.target_user(principal, user_id))

    async def check(
        self, principal: Principal, user_id: str, amount: int, scope: str = ""
    ) -> CreditCheck:
        target = access.target_user(principal, user_id)
        validation.positive_amount(amount)
        return await self._store.check(principal, target, amount, validation.spending_scope(scope))

    async def debit(
        self,
        principal: Principal,
        user_id: str,
        *,
        amount: int,
        idempotency_key: str,
        description: str,
        metadata: Mapping[str, str],
        scope: str = "",
    ) -> LedgerResult:
        target = access.target_user(principal, user_id)
        movement = _movement(amount, idempotency_key, description, metadata, scope)
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
        expire_time: datetime | None = None,
        effective_time: datetime | None = None,
        priority: int | None = None,
        category: GrantCategory | None = None,
        scopes: Sequence[str] = (),
    ) -> GrantResult:
        """Gives credits: `effective_time` None is now, `expire_time` None never, `priority`
        None 50, `category` None paid, `scopes` empty any spending."""
        access.require_service(principal)
        target = access.target_user(principal, user_id)
        movement = _movement(amount, idempotency_key, description, metadata)
        validation.grant_times(effective_time, expire_time)
        request = GrantRequest(
            amount=movement.amount,
            idempotency_key=movement.idempotency_key,
            description=movement.description,
            metadata=movement.metadata,
            expire_time=expire_time,
            effective_time=effective_time,
            priority=validation.priority(DEFAULT_GRANT_PRIORITY if priority is None else priority),
            category=category or GrantCategory.PAID,
            scopes=validation.grant_scopes(scopes),
        )
        return await self._store.grant(principal, target, request)

    async def void_grant(
        self, principal: Principal, grant_id: str, *, idempotency_key: str, description: str
    ) -> GrantResult:
        """Removes what is left of a grant, but what pending holds pin of it (service only)."""
        access.require_service(principal)
        void = VoidRequest(
            grant_id=validation.parse_uuid("grant_id", grant_id),
            idempotency_key=validation.idempotency_key(idempotency_key),
            description=validation.description(description),
        )
        return await self._store.void_grant(principal, void)

    async def list_grants(
        self,
        principal: Principal,
        user_id: str,
        page_size: int,
        page_token: str,
        states: frozenset[GrantState] = frozenset(),
    ) -> GrantPage:
        """One page of the user's grants, newest first, in `states` as of now (empty: all)."""
        target = access.target_user(principal, user_id)
        page, token = await self._pages.read_page(
            lambda limit, before: self._store.list_grants(principal, target, limit, before, states),
            user_id=target,
            scope=paging.listing("grants", sorted(states)),
            page_size=page_size,
            page_token=page_token,
            size_of=grant_bytes,
            max_bytes=self._max_page_bytes,
        )
        return GrantPage(page, token)

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
        scope: str = "",
    ) -> Reservation:
        target = access.target_user(principal, user_id)
        hold = HoldRequest(
            amount=validation.positive_amount(amount),
            idempotency_key=validation.idempotency_key(idempotency_key),
            ttl_seconds=validation.hold_ttl_seconds(ttl),
            description=validation.description(description),
            scope=validation.spending_scope(scope),
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
    allocations = ALLOCATION_BYTES * len(transaction.allocations)
    return (
        TRANSACTION_OVERHEAD_BYTES
        + texts
        + paging.entries_bytes(transaction.metadata)
        + allocations
    )


def grant_bytes(grant: Grant) -> int:
    """An upper bound of the grant's size in a ListGrants response."""
    scopes = validation.utf8_size(*grant.scopes) + SCOPE_FRAMING_BYTES * len(grant.scopes)
    return GRANT_OVERHEAD_BYTES + scopes


def _movement(
    amount: int, key: str, text: str, entries: Mapping[str, str], scope: str = ""
) -> Movement:
    return Movement(
        validation.positive_amount(amount),
        validation.idempotency_key(key),
        validation.description(text),
        validation.metadata(entries),
        validation.spending_scope(scope),
    )
