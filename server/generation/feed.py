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
from typing import TypeVar

from server.errors import ServerStopping
from server.generation.models import GenerationState

T = TypeVar("T")


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


async def change_within(
    changes: asyncio.Queue[T], stopping: asyncio.Event, seconds: float
) -> T | None:
    """The next change from `changes` within `seconds`, or None when none came (time for a
    watcher to re-read what it watches); ServerStopping as soon as `stopping` is set."""
    try:
        async with asyncio.timeout(seconds):
            change = await _next_change(changes, stopping)
    except TimeoutError:
        return None
    if change is None:
        raise ServerStopping()
    return change


async def _next_change(changes: asyncio.Queue[T], stopping: asyncio.Event) -> T | None:
    """The next change from `changes`, or None as soon as `stopping` is set (at once if it is).
    Cancelled meanwhile (a watcher's re-read timer), it loses no change: one already taken goes
    back into the queue."""
    if stopping.is_set():
        return None
    change = asyncio.ensure_future(changes.get())
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((change, stop), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        _give_back(changes, change)
        raise
    finally:
        stop.cancel()
    if stopping.is_set():
        _give_back(changes, change)
        return None
    return change.result()


def _give_back(changes: asyncio.Queue[T], taking: asyncio.Future[T]) -> None:
    """Stop `taking` from the queue, or put back what it took."""
    if not taking.done():
        taking.cancel()
    elif not taking.cancelled():
        changes.put_nowait(taking.result())
