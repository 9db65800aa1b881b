"""What the generation domain needs from storage; the repository implements it, a fake can too."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

from server.auth.principal import Principal
from server.generation.models import ClaimedJob, Generation, ModelSpec, QueueStats


class GenerationStore(Protocol):
    """The generations users create, read and cancel (through the caller's layer)."""

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
        """Queues a generation and reserves its cost, or returns the one `request_id` made."""
        ...

    async def get(
        self, principal: Principal, generation_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Generation: ...

    async def list(
        self, principal: Principal, user_id: uuid.UUID, limit: int, before_seq: int | None
    ) -> Sequence[Generation]: ...

    async def cancel(
        self, principal: Principal, generation_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Generation: ...


class JobQueue(Protocol):
    """The workers' side of the queue (service role only)."""

    async def claim(self, worker: str, lease_seconds: int) -> ClaimedJob | None: ...

    async def renew_lease(self, generation_id: uuid.UUID, worker: str, lease_seconds: int) -> bool:
        """Whether the job is still the worker's (False: cancelled, or taken over)."""
        ...

    async def complete(
        self, generation_id: uuid.UUID, worker: str, output: bytes, mime_type: str
    ) -> bool:
        """Stores the output and charges the cost; False when the result was discarded."""
        ...

    async def fail(
        self,
        generation_id: uuid.UUID,
        worker: str,
        error: str,
        *,
        retryable: bool,
        retry_delay_seconds: int,
    ) -> Generation: ...

    async def queue_stats(self) -> QueueStats: ...


class Catalogue(Protocol):
    async def sync_models(self, models: Sequence[ModelSpec]) -> None:
        """Makes the database's catalogue offer exactly `models`, at their prices."""
        ...
