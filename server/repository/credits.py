"""Typed access to the credit ledger's SQL functions, through the layered repository."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from server.auth.principal import Principal, UserPrincipal
from server.credit.models import (
    Capture,
    LedgerResult,
    Movement,
    Profile,
    Release,
    Reservation,
    Transaction,
    TransactionFilter,
)
from server.observability import metrics
from server.repository import functions, records
from server.repository.layered import LayeredRepository


class CreditRepository:
    def __init__(self, layers: LayeredRepository) -> None:
        self._layers = layers

    async def configure(self, *, signup_credits: int) -> None:
        await self._layers.call_as_service(
            functions.CONFIGURE, {"p_signup_credits": signup_credits}
        )

    async def ensure_profile(self, principal: UserPrincipal) -> None:
        await self._layers.ensure_profile(principal)

    async def get_profile(self, principal: Principal, user_id: uuid.UUID) -> Profile:
        row = await self._layers.call(principal, functions.GET_PROFILE, {"p_user_id": user_id})
        return records.profile(row)

    async def list_transactions(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        limit: int,
        before_seq: int | None,
        where: TransactionFilter,
    ) -> Sequence[Transaction]:
        rows = await self._layers.call(
            principal,
            functions.LIST_TRANSACTIONS,
            {
                "p_user_id": user_id,
                "p_limit": limit,
                "p_before_seq": before_seq,
                "p_kinds": sorted(where.kinds) or None,
                "p_start": where.start,
                "p_end": where.end,
            },
        )
        return [records.transaction(row) for row in rows]

    async def debit(
        self, principal: Principal, user_id: uuid.UUID, movement: Movement
    ) -> LedgerResult:
        return await self._move(functions.DEBIT, principal, user_id, movement)

    async def grant(
        self, principal: Principal, user_id: uuid.UUID, movement: Movement
    ) -> LedgerResult:
        return await self._move(functions.GRANT, principal, user_id, movement)

    async def reserve(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        *,
        amount: int,
        idempotency_key: str,
        ttl_seconds: int,
        description: str,
    ) -> Reservation:
        row = await self._layers.call(
            principal,
            functions.RESERVE,
            {
                "p_user_id": user_id,
                "p_amount": amount,
                "p_idempotency_key": idempotency_key,
                "p_ttl_seconds": ttl_seconds,
                "p_description": description,
            },
        )
        reservation = records.reservation(row)
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
        row = await self._layers.call(
            principal,
            functions.CAPTURE,
            {
                "p_hold_id": hold_id,
                "p_owner": owner,
                "p_amount": amount,
                "p_idempotency_key": idempotency_key,
            },
        )
        capture = records.capture(row)
        metrics.ledger_operation("capture", capture.replayed)
        return capture

    async def release(
        self, principal: Principal, hold_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Release:
        row = await self._layers.call(
            principal, functions.RELEASE, {"p_hold_id": hold_id, "p_owner": owner}
        )
        release = records.release(row)
        metrics.ledger_operation("release", replayed=False)
        return release

    async def refund(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        *,
        transaction_id: uuid.UUID,
        amount: int,
        idempotency_key: str,
        description: str,
    ) -> LedgerResult:
        row = await self._layers.call(
            principal,
            functions.REFUND,
            {
                "p_user_id": user_id,
                "p_transaction_id": transaction_id,
                "p_amount": amount,
                "p_idempotency_key": idempotency_key,
                "p_description": description,
            },
        )
        result = records.ledger_result(row)
        metrics.ledger_operation("refund", result.replayed)
        return result

    async def expire_holds(self, users: int) -> int:
        """Marks overdue holds expired for up to `users` users (bookkeeping; service role)."""
        swept: int = await self._layers.call_as_service(functions.EXPIRE_HOLDS, {"p_users": users})
        return swept

    async def _move(
        self,
        function: functions.SqlFunction,
        principal: Principal,
        user_id: uuid.UUID,
        movement: Movement,
    ) -> LedgerResult:
        row = await self._layers.call(
            principal,
            function,
            {
                "p_user_id": user_id,
                "p_amount": movement.amount,
                "p_idempotency_key": movement.idempotency_key,
                "p_description": movement.description,
                "p_metadata": dict(movement.metadata),
            },
        )
        result = records.ledger_result(row)
        metrics.ledger_operation(result.transaction.kind, result.replayed)
        return result
