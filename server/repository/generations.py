"""Typed access to the generation SQL functions, through the layered repository.

User-facing calls go through the layers (service role first, the user's JWT on refused service
credentials); the worker's calls and the catalogue sync need the service role.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.auth.principal import Principal
from server.generation.models import Generation, ModelSpec
from server.repository import functions
from server.repository.layered import LayeredRepository
from server.repository.records import generation


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job a worker holds the lease of."""

    generation_id: uuid.UUID
    model: str
    prompt: str
    parameters: Mapping[str, str]
    attempt: int


@dataclass(frozen=True, slots=True)
class QueueStats:
    queued: int
    running: int
    oldest_queued_seconds: float


class GenerationRepository:
    def __init__(self, layers: LayeredRepository) -> None:
        self._layers = layers

    async def sync_models(self, models: Sequence[ModelSpec]) -> None:
        rows = [
            {
                "model": m.model,
                "cost": m.cost,
                "description": m.description,
                "timeout_seconds": m.timeout_seconds,
                "max_attempts": m.max_attempts,
            }
            for m in models
        ]
        await self._layers.call_as_service(functions.SYNC_MODELS, {"p_models": rows})

    async def create(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        *,
        model: str,
        prompt: str,
        parameters: Mapping[str, str],
        request_id: str,
    ) -> Generation:
        row = await self._layers.call(
            principal,
            functions.CREATE_GENERATION,
            {
                "p_user_id": user_id,
                "p_model": model,
                "p_prompt": prompt,
                "p_parameters": dict(parameters),
                "p_request_id": request_id,
            },
        )
        return generation(row["generation"])

    async def get(
        self, principal: Principal, generation_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Generation:
        row = await self._layers.call(
            principal,
            functions.GET_GENERATION,
            {"p_generation_id": generation_id, "p_owner": owner},
        )
        return generation(row)

    async def list(
        self, principal: Principal, user_id: uuid.UUID, limit: int, before_seq: int | None
    ) -> Sequence[Generation]:
        rows = await self._layers.call(
            principal,
            functions.LIST_GENERATIONS,
            {"p_user_id": user_id, "p_limit": limit, "p_before_seq": before_seq},
        )
        return [generation(row) for row in rows]

    async def cancel(
        self, principal: Principal, generation_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Generation:
        row = await self._layers.call(
            principal,
            functions.CANCEL_GENERATION,
            {"p_generation_id": generation_id, "p_owner": owner},
        )
        return generation(row)

    async def queue_stats(self) -> QueueStats:
        row = await self._layers.call_as_service(functions.QUEUE_STATS, {})
        return QueueStats(row["queued"], row["running"], float(row["oldest_queued_seconds"]))

    # The worker's side (service role only).

    async def claim(self, worker: str, lease_seconds: int) -> ClaimedJob | None:
        row = await self._layers.call_as_service(
            functions.CLAIM_GENERATION, {"p_worker": worker, "p_lease_seconds": lease_seconds}
        )
        if not row:
            return None
        return ClaimedJob(
            generation_id=uuid.UUID(row["generation_id"]),
            model=row["model"],
            prompt=row["prompt"],
            parameters=row["parameters"],
            attempt=row["attempt"],
        )

    async def renew_lease(self, generation_id: uuid.UUID, worker: str, lease_seconds: int) -> bool:
        still_ours: bool = await self._layers.call_as_service(
            functions.RENEW_GENERATION_LEASE,
            {
                "p_generation_id": generation_id,
                "p_worker": worker,
                "p_lease_seconds": lease_seconds,
            },
        )
        return still_ours

    async def complete(
        self, generation_id: uuid.UUID, worker: str, output: bytes, mime_type: str
    ) -> bool:
        """Stores the output and charges the cost; False when the result was discarded."""
        row = await self._layers.call_as_service(
            functions.COMPLETE_GENERATION,
            {
                "p_generation_id": generation_id,
                "p_worker": worker,
                "p_output": base64.b64encode(output).decode(),
                "p_output_mime_type": mime_type,
            },
        )
        charged: bool = row["charged"]
        return charged

    async def fail(
        self,
        generation_id: uuid.UUID,
        worker: str,
        error: str,
        *,
        retryable: bool,
        retry_delay_seconds: int,
    ) -> Generation:
        row = await self._layers.call_as_service(
            functions.FAIL_GENERATION,
            {
                "p_generation_id": generation_id,
                "p_worker": worker,
                "p_error": error,
                "p_retryable": retryable,
                "p_retry_delay_seconds": retry_delay_seconds,
            },
        )
        return generation(row)
