"""Typed access to the credit ledger's SQL functions, through the layered repository."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from server.auth.principal import Principal
from server.credit.models import LedgerResult, Profile, Transaction
from server.repository import functions, records
from server.repository.layered import LayeredRepository


class CreditRepository:
    def __init__(self, layers: LayeredRepository) -> None:
        self._layers = layers

    async def configure(self, *, signup_credits: int) -> None:
        await self._layers.call_as_service(
            functions.CONFIGURE, {"p_signup_credits": signup_credits}
        )

    async def get_profile(self, principal: Principal, user_id: uuid.UUID) -> Profile:
        row = await self._layers.call(principal, functions.GET_PROFILE, {"p_user_id": user_id})
        return records.profile(row)

    async def list_transactions(
        self, principal: Principal, user_id: uuid.UUID, limit: int, before_seq: int | None
    ) -> Sequence[Transaction]:
        rows = await self._layers.call(
            principal,
            functions.LIST_TRANSACTIONS,
            {"p_user_id": user_id, "p_limit": limit, "p_before_seq": before_seq},
        )
        return [records.transaction(row) for row in rows]

    async def debit(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        *,
        amount: int,
        idempotency_key: str,
        description: str,
        metadata: Mapping[str, str],
    ) -> LedgerResult:
        return await self._move(
            functions.DEBIT, principal, user_id, amount, idempotency_key, description, metadata
        )

    async def grant(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        *,
        amount: int,
        idempotency_key: str,
        description: str,
        metadata: Mapping[str, str],
    ) -> LedgerResult:
        return await self._move(
            functions.GRANT, principal, user_id, amount, idempotency_key, description, metadata
        )

    async def _move(
        self,
        function: functions.SqlFunction,
        principal: Principal,
        user_id: uuid.UUID,
        amount: int,
        idempotency_key: str,
        description: str,
        metadata: Mapping[str, str],
    ) -> LedgerResult:
        row = await self._layers.call(
            principal,
            function,
            {
                "p_user_id": user_id,
                "p_amount": amount,
                "p_idempotency_key": idempotency_key,
                "p_description": description,
                "p_metadata": dict(metadata),
            },
        )
        return records.ledger_result(row)
