"""Prometheus metrics, served on CREDITS_METRICS_LISTEN (off when unset).

RPCs by method, status code and protocol (the gRPC or the Connect edge) with their latency,
credential fallbacks and the breaker, ledger operations, the generation queue and worker
outcomes, the database pool's use, whether the database answers, restarts of the embedded
PostgreSQL, the database's warnings and the background loops' unexpected errors. Names are
prefixed `credits_`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from server.config import host_port
from server.errors import CreditsError

if TYPE_CHECKING:
    from server.events.models import DeliveryStats
    from server.generation.models import QueueStats

log = logging.getLogger(__name__)

RPCS = Counter(
    "credits_rpcs",
    "RPCs served, by method, status code and protocol (grpc, connect)",
    ["method", "code", "protocol"],
)
RPC_SECONDS = Histogram(
    "credits_rpc_seconds",
    "Time to serve an RPC, by method and protocol (grpc, connect)",
    ["method", "protocol"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RPC_ERRORS = Counter(
    "credits_rpc_errors",
    "Failed RPCs, by method and the ErrorInfo reason they were answered with",
    ["method", "reason"],
)
CREDENTIAL_REJECTIONS = Counter(
    "credits_service_credential_rejections",
    "Times the database refused the service credentials (each opens the breaker)",
)
BREAKER_OPEN = Gauge(
    "credits_service_layer_breaker_open",
    "1 while refused service credentials send calls straight to the user layer",
)
USER_LAYER_CALLS = Counter(
    "credits_user_layer_calls", "Calls served through the caller's own JWT (the fallback layer)"
)
LEDGER_OPERATIONS = Counter(
    "credits_ledger_operations",
    "Money operations done, by kind (debit, grant, refund, reserve, capture, release) and "
    "whether they were replays of an earlier call",
    ["kind", "replayed"],
)
WORKER_OUTCOMES = Counter(
    "credits_generation_attempts",
    "Generation attempts by outcome: succeeded, failed, retried, discarded",
    ["outcome"],
)
GENERATION_QUEUE = Gauge(
    "credits_generation_queue", "Generations waiting or being worked on, by state", ["state"]
)
OLDEST_QUEUED_SECONDS = Gauge(
    "credits_generation_oldest_queued_seconds", "How long the oldest queued generation has waited"
)
SETTLEMENT_LAG_SECONDS = Gauge(
    "credits_settlement_lag_seconds",
    "Seconds since the user due longest fell due for settlement (holds and grants expiring, "
    "grants becoming effective), as of the last sweep; 0 when nobody is due",
)
POOL_CONNECTIONS = Gauge(
    "credits_db_pool_connections", "Database pool connections, by state", ["state"]
)
DATABASE_REACHABLE = Gauge(
    "credits_database_reachable",
    "1 while the database answers the health probe (every 2 s), 0 while it does not: health "
    "says NOT_SERVING then",
)
EMBEDDED_POSTGRES_RESTARTS = Counter(
    "credits_embedded_postgres_restarts",
    "Times the embedded PostgreSQL was started again after its postmaster died",
)
BATCHED_CALLS = Histogram(
    "credits_db_batch_calls",
    "Calls sent to the database together while the pool was busy, per batch, by function",
    ["function"],
    buckets=(1, 2, 4, 8, 16, 32),
)
WEBHOOK_DELIVERIES = Counter(
    "credits_webhook_deliveries",
    "Webhook delivery attempts by outcome: delivered, retried (failed, tried again later), "
    "failed (given up), lost (the lease had passed to another deliverer)",
    ["outcome"],
)
WEBHOOK_BACKLOG = Gauge(
    "credits_webhook_backlog",
    "Webhook deliveries not delivered, by state (pending, failed)",
    ["state"],
)
WEBHOOK_OLDEST_PENDING_SECONDS = Gauge(
    "credits_webhook_oldest_undelivered_seconds",
    "How long the oldest pending webhook delivery has waited",
)
DATABASE_WARNINGS = Counter(
    "credits_database_warnings",
    "WARNINGs the database sent the service over DATABASE_URL (the sweeper names a user it "
    "could not settle this way)",
)
BACKGROUND_ERRORS = Counter(
    "credits_background_errors",
    "Errors a background loop did not expect, by loop (event_pump, webhook_deliverer, "
    "hold_sweeper, generation_worker, queue_gauges, change_feed): logged with a traceback, "
    "and the loop went on",
    ["loop"],
)


def unexpected(loop: str, logger: logging.Logger, message: str, *args: object) -> None:
    """Log the error a background `loop` did not expect, with its traceback, and count it (the
    loop goes on). Call it from the `except` block."""
    logger.exception(message, *args)
    BACKGROUND_ERRORS.labels(loop).inc()


@functools.cache
def _rpc_series(method: str, code: str, protocol: str) -> tuple[Counter, Histogram]:
    # Label lookups validate and lock on every call; a method's series are few and fixed.
    return RPCS.labels(method, code, protocol), RPC_SECONDS.labels(method, protocol)


def rpc_done(method: str, code: str, seconds: float, protocol: str = "grpc") -> None:
    """Count an RPC that came through `protocol`'s edge and ended with `code` after
    `seconds`."""
    calls, duration = _rpc_series(method, code, protocol)
    calls.inc()
    duration.observe(seconds)


@functools.cache
def _error_series(method: str, reason: str) -> Counter:
    return RPC_ERRORS.labels(method, reason)


def rpc_failed(method: str, reason: str) -> None:
    """Count an RPC that failed with the ErrorInfo `reason`."""
    _error_series(method, reason).inc()


@functools.cache
def _ledger_series(kind: str, replayed: bool) -> Counter:
    return LEDGER_OPERATIONS.labels(kind, "true" if replayed else "false")


def ledger_operation(kind: str, replayed: bool) -> None:
    """Count one money operation of `kind`, a replay of an earlier call or not."""
    _ledger_series(kind, replayed).inc()


def webhook_delivery(outcome: str) -> None:
    """Count one webhook delivery attempt that ended with `outcome`."""
    WEBHOOK_DELIVERIES.labels(outcome).inc()


def webhook_backlog(stats: DeliveryStats) -> None:
    """Set the webhook backlog gauges from `stats` (read by the event pump)."""
    WEBHOOK_BACKLOG.labels("pending").set(stats.pending)
    WEBHOOK_BACKLOG.labels("failed").set(stats.failed)
    WEBHOOK_OLDEST_PENDING_SECONDS.set(stats.oldest_pending_seconds)


def watch_pool(size: Callable[[], int], idle: Callable[[], int]) -> None:
    """Report a connection pool's size and idle connections when scraped."""
    POOL_CONNECTIONS.labels("open").set_function(size)
    POOL_CONNECTIONS.labels("idle").set_function(idle)


async def track_queue(read: Callable[[], Awaitable[QueueStats]], interval: float = 2.0) -> None:
    """Keep the queue gauges current (the database is asked; a scrape cannot wait for it)."""
    while True:
        try:
            stats = await read()
        except CreditsError as error:
            log.warning("cannot read the generation queue (%s)", error.reason)
        except Exception:
            unexpected("queue_gauges", log, "cannot read the generation queue")
        else:
            GENERATION_QUEUE.labels("queued").set(stats.queued)
            GENERATION_QUEUE.labels("running").set(stats.running)
            OLDEST_QUEUED_SECONDS.set(stats.oldest_queued_seconds)
        await asyncio.sleep(interval)


def serve(listen: str) -> WSGIServer:
    """Serve /metrics on `listen` ("host:port"; port 0 picks one) from a thread of its own;
    `shutdown()` the server returned to stop it."""
    host, port = host_port(listen)
    server, _thread = start_http_server(port, addr=host or "127.0.0.1")
    return server
