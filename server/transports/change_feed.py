"""The generation change feed and the balance feed, fed by PostgreSQL's LISTEN/NOTIFY.

One listening connection per process (not one of the pool's) publishes the `credit_generations`
notifications into the domain's ChangeFeed, and the `credit_balances` ones into its
BalanceFeed. If the connection drops, it is opened again;
watchers also re-read on a slow timer, so a notification lost in between delays a message but
never loses the final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from server import runtime
from server.events.feed import BalanceFeed
from server.events.models import Balance, BalanceChange
from server.generation.feed import ChangeFeed, StateChange
from server.generation.models import GenerationState
from server.observability import metrics

log = logging.getLogger(__name__)

CHANNEL = "credit_generations"
BALANCE_CHANNEL = "credit_balances"


def state_change(payload: str) -> StateChange:
    """The change a notification's JSON payload describes."""
    event = json.loads(payload)
    transaction = event.get("transaction_id")
    return StateChange(
        generation_id=uuid.UUID(event["generation_id"]),
        state=GenerationState(event["state"]),
        attempts=int(event["attempts"]),
        error_message=str(event["error_message"]),
        transaction_id=uuid.UUID(transaction) if transaction else None,
        output_mime_type=str(event["output_mime_type"]),
        update_time=datetime.fromisoformat(event["update_time"]),
    )


def balance_change(payload: str) -> BalanceChange:
    """The balance change a credit_balances notification's JSON payload describes."""
    event = json.loads(payload)
    balance = Balance(
        user_id=uuid.UUID(event["user_id"]),
        balance=int(event["balance"]),
        held=int(event["held"]),
        available=int(event["available"]),
        update_time=datetime.fromisoformat(event["update_time"]),
    )
    return BalanceChange(balance, int(event["xid"]))


class PostgresChangeFeed(ChangeFeed):
    """A ChangeFeed fed by LISTEN on its own connection."""

    live = True

    def __init__(
        self, url: str, reconnect_delay: float = 1.0, balances: BalanceFeed | None = None
    ) -> None:
        super().__init__()
        self._url = url
        self.balances = balances or BalanceFeed()
        self.balances.live = True
        self._reconnect_delay = reconnect_delay
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="generation-change-feed")
        await self._listening.wait()

    async def close(self) -> None:
        if self._task is not None:
            await runtime.stop(self._task)

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
            except Exception:
                # Lost while it set up (asyncpg raises then), or a bug: listen again, later.
                metrics.unexpected("change_feed", log, "change feed failed; listening again")
                await asyncio.sleep(self._reconnect_delay)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _listen(self, conn: asyncpg.Connection) -> None:
        """Deliver notifications until the connection is lost."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        await conn.add_listener(CHANNEL, self._notified)
        await conn.add_listener(BALANCE_CHANNEL, self._balance_notified)
        self._listening.set()
        await lost.wait()

    def _notified(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        try:
            self.publish(state_change(str(payload)))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed %s notification", CHANNEL)

    def _balance_notified(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        try:
            self.balances.publish(balance_change(str(payload)))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed %s notification", BALANCE_CHANNEL)
