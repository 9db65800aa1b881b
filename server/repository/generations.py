"""The generation domain's stores (server/generation/ports.py) over the SQL functions.

User-facing calls go through the layers (service role first, the user's JWT on refused service
credentials); the workers' queue and the catalogue sync need the service role.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence

from server.auth.principal import Principal
from server.errors import CreditsError
from server.generation.models import ClaimedJob, Generation, ModelSpec, QueueStats
from server.observability import tracing
from server.repository import functions as fn
from server.repository.layered import LayeredRepository


class GenerationRepository:
    def __init__(self, layers: LayeredRepository) -> None:
        self._layers = layers

    async def sync_models(self, models: Sequence[ModelSpec]) -> None:
        rows: list[dict[str, object]] = [
            {
                "model": m.model,
                "cost": m.cost,
                "description": m.description,
                "timeout_seconds": m.timeout_seconds,
                "max_attempts": m.max_attempts,
            }
            for m in models
        ]
        await self._layers.call_as_service(fn.SyncModels(rows))

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
        trace = tracing.traceparent()
        call = (
            fn.CreateGeneration(user_id, model, prompt, dict(parameters), request_id)
            if trace is None
            else fn.CreateTracedGeneration(
                user_id, model, prompt, dict(parameters), request_id, trace
            )
        )
        return await self._layers.call(principal, call)

    async def get(
        self, principal: Principal, generation_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Generation:
        return await self._layers.call(principal, fn.GetGeneration(generation_id, owner))

    async def list(
        self, principal: Principal, user_id: uuid.UUID, limit: int, before_seq: int | None
    ) -> Sequence[Generation]:
        return await self._layers.call(principal, fn.ListGenerations(user_id, limit, before_seq))

    async def cancel(
        self, principal: Principal, generation_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Generation:
        return await self._layers.call(principal, fn.CancelGeneration(generation_id, owner))

    async def queue_stats(self) -> QueueStats:
        return await self._layers.call_as_service(fn.GetQueueStats())

    async def claim(self, worker: str, lease_seconds: int) -> ClaimedJob | None:
        """The next job, with the trace context it was queued in while tracing is on (a
        call of its own: the claim's result is the same with tracing on or off)."""
        job = await self._layers.call_as_service(fn.ClaimGeneration(worker, lease_seconds))
        if job is None or not tracing.active:
            return job
        try:
            trace = await self._layers.call_as_service(fn.GenerationTraceparent(job.generation_id))
        except CreditsError:
            return job  # it runs all the same, in a trace of its own
        return dataclasses.replace(job, traceparent=trace)

    async def renew_lease(self, generation_id: uuid.UUID, worker: str, lease_seconds: int) -> bool:
        call = fn.RenewGenerationLease(generation_id, worker, lease_seconds)
        return await self._layers.call_as_service(call)

    async def complete(
        self, generation_id: uuid.UUID, worker: str, output: bytes, mime_type: str
    ) -> bool:
        call = fn.CompleteGeneration.of(generation_id, worker, output, mime_type)
        return await self._layers.call_as_service(call)

    async def fail(
        self,
        generation_id: uuid.UUID,
        worker: str,
        error: str,
        *,
        retryable: bool,
        retry_delay_seconds: int,
    ) -> Generation:
        call = fn.FailGeneration(generation_id, worker, error, retryable, retry_delay_seconds)
        return await self._layers.call_as_service(call)
