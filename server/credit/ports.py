"""What the credit domain needs from storage; the repository implements it, a fake can too.

Every method takes the caller's principal: the store decides through which layer it reaches
the database (the service role, or the caller's own JWT), never whether the caller may act.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

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


class CreditStore(Protocol):
    async def get_profile(self, principal: Principal, user_id: uuid.UUID) -> Profile: ...

    async def check(
        self, principal: Principal, user_id: uuid.UUID, amount: int, scope: str
    ) -> CreditCheck:
        """Whether `amount` could be spent now with `scope` ("" unscoped): the grants that
        would pay for it, less what holds pin of them."""
        ...

    async def list_transactions(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        limit: int,
        before_seq: int | None,
        where: TransactionFilter,
    ) -> Sequence[Transaction]: ...

    async def debit(
        self, principal: Principal, user_id: uuid.UUID, movement: Movement
    ) -> LedgerResult: ...

    async def grant(
        self, principal: Principal, user_id: uuid.UUID, grant: GrantRequest
    ) -> GrantResult: ...

    async def void_grant(self, principal: Principal, void: VoidRequest) -> GrantResult:
        """Removes the unpinned remainder of the grant `void` names (of any user)."""
        ...

    async def list_grants(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        limit: int,
        before_seq: int | None,
        states: frozenset[GrantState],
    ) -> Sequence[Grant]:
        """Up to `limit` of the user's grants before `before_seq`, newest first, in `states`
        as of now (empty: all)."""
        ...

    async def refund(
        self, principal: Principal, user_id: uuid.UUID | None, refund: RefundRequest
    ) -> LedgerResult:
        """Refunds the transaction `refund` names, of `user_id` (None: of its owner)."""
        ...

    async def reserve(
        self, principal: Principal, user_id: uuid.UUID, hold: HoldRequest
    ) -> Reservation: ...

    async def capture(
        self,
        principal: Principal,
        hold_id: uuid.UUID,
        owner: uuid.UUID | None,
        *,
        amount: int,
        idempotency_key: str,
    ) -> Capture: ...

    async def release(
        self, principal: Principal, hold_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Release: ...


class ControlStore(Protocol):
    """Spending limits, usage and the export (server/credit/controls.py)."""

    async def set_spend_limit(
        self, principal: Principal, user_id: uuid.UUID, period: SpendPeriod, limit: int
    ) -> list[SpendLimit]:
        """Sets (0: removes) the user's own limit; the limits in force after it."""
        ...

    async def get_spend_limits(
        self, principal: Principal, user_id: uuid.UUID
    ) -> list[SpendLimit]: ...

    async def get_usage(
        self, principal: Principal, user_id: uuid.UUID, query: UsageQuery
    ) -> list[UsageBucket]: ...

    async def export_transactions(
        self, query: ExportQuery, after: ExportCursor | None, limit: int
    ) -> list[Transaction]:
        """Up to `limit` entries after `after` (None: from the start), with the service role."""
        ...


class HoldExpiry(Protocol):
    async def expire_holds(self, users: int) -> int:
        """Marks overdue holds expired, and writes the due activations and expiries of grants,
        for up to `users` users; returns how many it settled."""
        ...

    async def settlement_lag(self) -> float:
        """Seconds since the user due longest fell due for settlement; 0 when none is."""
        ...


class ProfileStore(Protocol):
    async def provision(self, principal: UserPrincipal) -> None:
        """Creates the caller's own profile if it does not exist (with the signup credits)."""
        ...

    async def provision_known(self, user_id: uuid.UUID) -> None:
        """Creates the profile of a user the identity provider knows (auth.users) if it does
        not exist; ProfileNotFound for a user it does not know."""
        ...
