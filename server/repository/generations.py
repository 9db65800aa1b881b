"""The generation domain's stores (server/generation/ports.py) over the SQL functions.

User-facing calls go through the layers (service role first, the user's JWT on refused service
credentials); the workers' queue and the catalogue sync need the service role.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from server.auth.principal import Principal
from server.errors import BackendUnavailable, CreditsError
from server.generation.models import ClaimedJob, Generation, ModelSpec, QueueStats
from server.observability import tracing
from server.repository import functions as fn
from server.repository.coalescing import Coalescer
from server.repository.layered import LayeredRepository

log = logging.getLogger(__name__)

# At most this many jobs in one claim or completion (the SQL functions take 32 at most).
MAX_BATCH = 32
# A larger output is stored alone, so that one call never carries many large outputs.
MAX_BATCHED_OUTPUT_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class _Completion:
    generation_id: uuid.UUID
    worker: str
    output: bytes
    mime_type: str


class GenerationRepository:
    def __init__(self, layers: LayeredRepository) -> None:
        self._layers = layers
        # The workers of this process claim and complete together what they do at the same
        # time (one transaction for all: see server/repository/coalescing.py).
        self._claims: dict[int, Coalescer[str, ClaimedJob | None]] = {}
        self._completions = Coalescer(self._complete_together, MAX_BATCH)

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
        claims = self._claims.get(lease_seconds)
        if claims is None:
            claims = self._claims[lease_seconds] = Coalescer(
                lambda workers: self._claim_together(workers, lease_seconds), MAX_BATCH
            )
        job = await claims.call(worker)
        if job is None or not tracing.active:
            return job
        try:
            trace = await self._layers.call_as_service(fn.GenerationTraceparent(job.generation_id))
        except CreditsError:
            return job  # it runs all the same, in a trace of its own
        return dataclasses.replace(job, traceparent=trace)

    async def _claim_together(
        self, workers: Sequence[str], lease_seconds: int
    ) -> Sequence[ClaimedJob | None]:
        call = fn.ClaimGenerations(list(workers), lease_seconds)
        jobs = await self._layers.call_as_service(call)
        return [jobs.get(worker) for worker in workers]

    async def renew_lease(self, generation_id: uuid.UUID, worker: str, lease_seconds: int) -> bool:
        call = fn.RenewGenerationLease(generation_id, worker, lease_seconds)
        return await self._layers.call_as_service(call)

    async def complete(
        self, generation_id: uuid.UUID, worker: str, output: bytes, mime_type: str
    ) -> bool:
        if len(output) > MAX_BATCHED_OUTPUT_BYTES:
            call = fn.CompleteGeneration.of(generation_id, worker, output, mime_type)
            return await self._layers.call_as_service(call)
        return await self._completions.call(_Completion(generation_id, worker, output, mime_type))

    async def _complete_together(
        self, completions: Sequence[_Completion]
    ) -> Sequence[bool | BaseException]:
        if len(completions) == 1:  # no subtransaction needed
            (c,) = completions
            call = fn.CompleteGeneration.of(c.generation_id, c.worker, c.output, c.mime_type)
            return [await self._layers.call_as_service(call)]
        jobs = [
            {
                "generation_id": str(c.generation_id),
                "worker": c.worker,
                "output": base64.b64encode(c.output).decode(),
                "output_mime_type": c.mime_type,
            }
            for c in completions
        ]
        results = await self._layers.call_as_service(fn.CompleteGenerations(jobs))
        return [_charged(c, result) for c, result in zip(completions, results, strict=True)]

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


def _charged(completion: _Completion, result: dict[str, Any]) -> bool | BaseException:
    """One job's result in a completion of several: whether it was charged, or, for the error
    it raised (a deadlock, say), BackendUnavailable: the job is left to its lease, as when the
    database cannot be reached."""
    if "error_code" not in result:
        return bool(result["charged"])
    log.warning(
        "the result of %s was not recorded (SQLSTATE %s: %s)",
        completion.generation_id,
        result["error_code"],
        result["error_message"],
    )
    return BackendUnavailable()
