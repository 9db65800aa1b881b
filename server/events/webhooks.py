"""Webhook delivery: the pump that fans events out into deliveries, and the deliverers that
POST them, signed per the Standard Webhooks specification, with retries.

Deliverers lease deliveries (`for update skip locked` in SQL), so any number of them, in any
number of processes, deliver each event to each endpoint at least once and normally once: a
deliverer that dies leaves its lease to run out, and the delivery is claimed again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from server import runtime
from server.errors import CreditsError
from server.events.models import ClaimedDelivery, Event
from server.events.ports import DeliveryQueue
from server.observability import metrics

log = logging.getLogger(__name__)

# The delay before each retry, in seconds: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (the
# Standard Webhooks reference schedule); eight attempts over about 27.6 hours, then FAILED.
DEFAULT_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
# Each delay varies by up to this fraction either way, so failed deliveries spread out.
JITTER = 0.2


def new_secret() -> str:
    """A webhook signing secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def retry_delay(
    attempt: int, schedule: Sequence[float], rand: Callable[[float, float], float] = random.uniform
) -> float | None:
    """The delay after failed attempt number `attempt` (from 1) before the next, with jitter;
    None when the schedule is spent."""
    if attempt > len(schedule):
        return None
    return schedule[attempt - 1] * (1 + rand(-JITTER, JITTER))


def body(event: Event) -> bytes:
    """The request body: the event as JSON (`type`, `timestamp` and `data` per the Standard
    Webhooks payload structure, with the event's id and user)."""
    return json.dumps(
        {
            "id": str(event.event_id),
            "type": event.type,
            "timestamp": event.create_time.isoformat(),
            "user_id": str(event.user_id),
            "data": event.payload,
        },
        separators=(",", ":"),
    ).encode()


def signed_headers(event: Event, content: bytes, secret: str, now: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (webhook-id is the event's id)."""
    msg_id = str(event.event_id)
    return {
        "content-type": "application/json",
        "user-agent": "credits-webhooks",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, content),
    }


@dataclass(frozen=True)
class DeliverySettings:
    # Delays before each retry (seconds); its length is how many retries there are.
    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    # How long one POST may take, connecting included.
    timeout_seconds: float = 10.0
    # How long a claim lasts; a deliverer that dies gives its deliveries up after it.
    lease_seconds: int = 30
    # Deliveries one deliverer claims and sends at once.
    batch: int = 10
    # How long an idle deliverer waits before it looks again (unless woken).
    idle_seconds: float = 1.0


class Deliverer:
    """Claims due deliveries and POSTs them, one batch at a time."""

    def __init__(
        self,
        queue: DeliveryQueue,
        client: httpx.AsyncClient,
        settings: DeliverySettings,
        name: str | None = None,
    ) -> None:
        self._queue = queue
        self._client = client
        self._settings = settings
        self.name = name or f"deliverer-{secrets.token_hex(6)}"

    async def deliver_due(self) -> int:
        """Deliver one batch of due deliveries; returns how many were claimed."""
        settings = self._settings
        claimed = await self._queue.claim(self.name, settings.batch, settings.lease_seconds)
        await asyncio.gather(*(self._deliver(d) for d in claimed))
        return len(claimed)

    async def _deliver(self, delivery: ClaimedDelivery) -> None:
        content = body(delivery.event)
        headers = signed_headers(delivery.event, content, delivery.secret, datetime.now(UTC))
        status: int | None = None
        try:
            answer = await self._client.post(
                delivery.url,
                content=content,
                headers=headers,
                timeout=self._settings.timeout_seconds,
            )
            status = answer.status_code
            error = "" if 200 <= status < 300 else f"HTTP {status}"
        except httpx.HTTPError as failure:
            error = f"{type(failure).__name__}: {failure}"[:500]
        delivered = not error
        retry = None if delivered else retry_delay(delivery.attempt, self._settings.schedule)
        try:
            state = await self._queue.finish(
                delivery.delivery_id,
                self.name,
                delivered=delivered,
                status=status,
                error=error,
                retry_seconds=retry,
            )
        except CreditsError as failure:
            # Not recorded: the lease runs out and the delivery is sent again.
            log.warning("cannot record delivery %s (%s)", delivery.delivery_id, failure.reason)
            return
        outcome = {"delivered": "delivered", "failed": "failed", "pending": "retried"}
        metrics.webhook_delivery(outcome.get(state or "", "lost"))
        if not delivered:
            log.info(
                "webhook delivery %s attempt %d to %s failed: %s",
                delivery.delivery_id,
                delivery.attempt,
                delivery.url,
                error,
            )


class DeliveryPool:
    """`count` deliverers and the pump, in the background until stopped."""

    def __init__(
        self,
        queue: DeliveryQueue,
        count: int,
        settings: DeliverySettings | None = None,
        *,
        pump_interval: float = 1.0,
        notice_interval: float = 30.0,
    ) -> None:
        self._queue = queue
        self._settings = settings or DeliverySettings()
        self._client = httpx.AsyncClient(follow_redirects=False)
        self.deliverers = [Deliverer(queue, self._client, self._settings) for _ in range(count)]
        self._pump_interval = pump_interval
        self._notice_interval = notice_interval
        self._due = asyncio.Event()
        self._stopping = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._pump = asyncio.create_task(self._run_pump(), name="event-pump")
        self._tasks = [asyncio.create_task(self._run(d), name=d.name) for d in self.deliverers]

    async def stop(self, grace: float) -> None:
        """Claim nothing more; deliveries in flight get `grace` seconds to finish (one cut
        short is delivered again after its lease)."""
        self._stopping.set()
        self._due.set()
        if self._pump is not None:
            await runtime.stop(self._pump)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)
            await runtime.stop(*self._tasks)
        await self._client.aclose()

    async def pump_once(self) -> int:
        """Fan out every event committed so far; returns how many."""
        total = 0
        while True:
            moved = await self._queue.dispatch(500)
            total += moved
            if moved < 500:
                return total

    async def _run_pump(self) -> None:
        loop = asyncio.get_running_loop()
        noticed_at = -self._notice_interval
        while True:
            try:
                if loop.time() - noticed_at >= self._notice_interval:
                    await self._queue.notice_expiring_grants(1000)
                    noticed_at = loop.time()
                if await self.pump_once():
                    self._due.set()
                metrics.webhook_backlog(await self._queue.stats())
            except CreditsError as error:
                log.warning("event pump: %s", error.reason)
            except Exception:
                # A bug, or an error the database should not have raised: the pump goes on (one
                # that ended would leave every event after undispatched until a restart).
                metrics.unexpected("event_pump", log, "event pump: unexpected error")
            await asyncio.sleep(self._pump_interval)

    async def _run(self, deliverer: Deliverer) -> None:
        while not self._stopping.is_set():
            try:
                claimed = await deliverer.deliver_due()
            except CreditsError as error:
                log.warning("webhook deliverer: %s", error.reason)
                claimed = 0
            except Exception:
                metrics.unexpected("webhook_deliverer", log, "webhook deliverer: unexpected error")
                claimed = 0
            if claimed or self._stopping.is_set():
                continue
            self._due.clear()
            try:
                async with asyncio.timeout(self._settings.idle_seconds):
                    await self._due.wait()
            except TimeoutError:
                pass
