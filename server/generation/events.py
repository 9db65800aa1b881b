"""Generation state changes as they happen, from PostgreSQL's LISTEN/NOTIFY.

One listening connection per process fans the `credit_generations` notifications out to the
watchers of each generation, and wakes idle workers when a job is queued. If the connection
drops, it is opened again; watchers also re-read on a slow timer, so a notification lost in
between delays a message but never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "credit_generations"


class ChangeFeed:
    """Per-generation queues of new states, and an event set whenever a job is queued."""

    def __init__(self) -> None:
        self._watchers: defaultdict[uuid.UUID, set[asyncio.Queue[str]]] = defaultdict(set)
        self.queued = asyncio.Event()

    @contextlib.asynccontextmanager
    async def changes(self, generation_id: uuid.UUID) -> AsyncIterator[asyncio.Queue[str]]:
        """The states `generation_id` enters from now on, while the context is open."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._watchers[generation_id].add(queue)
        try:
            yield queue
        finally:
            self._watchers[generation_id].discard(queue)
            if not self._watchers[generation_id]:
                del self._watchers[generation_id]

    def publish(self, generation_id: uuid.UUID, state: str) -> None:
        for queue in self._watchers.get(generation_id, ()):
            queue.put_nowait(state)
        if state == "queued":
            self.queued.set()


class PostgresChangeFeed(ChangeFeed):
    """A ChangeFeed fed by LISTEN on its own connection (not one of the pool's)."""

    def __init__(self, url: str, reconnect_delay: float = 1.0) -> None:
        super().__init__()
        self._url = url
        self._reconnect_delay = reconnect_delay
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="generation-change-feed")
        await self._listening.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                conn = await asyncpg.connect(self._url)
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("change feed cannot connect (%s); retrying", type(error).__name__)
                await asyncio.sleep(self._reconnect_delay)
                continue
            try:
                await self._listen(conn)
                log.warning("change feed connection lost; listening again")
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _listen(self, conn: asyncpg.Connection) -> None:
        """Deliver notifications until the connection is lost."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        await conn.add_listener(CHANNEL, self._notified)
        self._listening.set()
        await lost.wait()

    def _notified(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        try:
            event = json.loads(str(payload))
            self.publish(uuid.UUID(event["generation_id"]), event["state"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed %s notification", CHANNEL)
