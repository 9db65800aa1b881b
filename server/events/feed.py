"""Balance changes as they are announced, fanned out to the watchers of each user.

In memory: on PostgreSQL the LISTEN connection of server/transports/change_feed.py publishes
into it (channel credit_balances); without a publisher, watchers poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

from server.events.models import BalanceChange


class BalanceFeed:
    """Per-user queues of announced balance changes."""

    # Whether changes are announced as they commit (else watchers poll).
    live = False

    def __init__(self) -> None:
        self._watchers: defaultdict[uuid.UUID, set[asyncio.Queue[BalanceChange]]] = defaultdict(set)

    @contextlib.asynccontextmanager
    async def changes(self, user_id: uuid.UUID) -> AsyncIterator[asyncio.Queue[BalanceChange]]:
        """The changes of `user_id`'s balance announced from now on, while the context is open."""
        queue: asyncio.Queue[BalanceChange] = asyncio.Queue()
        self._watchers[user_id].add(queue)
        try:
            yield queue
        finally:
            self._watchers[user_id].discard(queue)
            if not self._watchers[user_id]:
                del self._watchers[user_id]

    def publish(self, change: BalanceChange) -> None:
        for queue in self._watchers.get(change.balance.user_id, ()):
            queue.put_nowait(change)
