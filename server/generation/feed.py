"""Generation state changes as they happen, fanned out to the watchers of each generation.

The feed itself is in memory: something on the transport side publishes into it (on PostgreSQL,
the LISTEN connection of server/transports/change_feed.py). Without a publisher, watchers
re-read on a timer, and idle workers are woken by jobs queued in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from server.generation.models import GenerationState


@dataclass(frozen=True, slots=True)
class StateChange:
    """A generation's new state and the other fields a transition changes (not the output)."""

    generation_id: uuid.UUID
    state: GenerationState
    attempts: int
    error_message: str
    transaction_id: uuid.UUID | None
    output_mime_type: str
    update_time: datetime


class ChangeFeed:
    """Per-generation queues of state changes, and an event set whenever a job is queued."""

    # Whether changes are published as they happen (else watchers must re-read more often).
    live = False

    def __init__(self) -> None:
        self._watchers: defaultdict[uuid.UUID, set[asyncio.Queue[StateChange]]] = defaultdict(set)
        self.queued = asyncio.Event()

    @contextlib.asynccontextmanager
    async def changes(self, generation_id: uuid.UUID) -> AsyncIterator[asyncio.Queue[StateChange]]:
        """The changes `generation_id` goes through from now on, while the context is open."""
        queue: asyncio.Queue[StateChange] = asyncio.Queue()
        self._watchers[generation_id].add(queue)
        try:
            yield queue
        finally:
            self._watchers[generation_id].discard(queue)
            if not self._watchers[generation_id]:
                del self._watchers[generation_id]

    def publish(self, change: StateChange) -> None:
        for queue in self._watchers.get(change.generation_id, ()):
            queue.put_nowait(change)
        if change.state == GenerationState.QUEUED:
            self.queued.set()

    async def close(self) -> None:
        """Stops whatever publishes into the feed (nothing, here)."""
