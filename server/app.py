"""The composition root: builds the service from its settings, serves it, and shuts it down."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import TextIO
from wsgiref.simple_server import WSGIServer

import asyncpg
import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from credits.v1 import (
    credit_service_connect,
    credit_service_pb2,
    credit_service_pb2_grpc,
    generation_service_connect,
    generation_service_pb2,
    generation_service_pb2_grpc,
)
from server import ledger_export, reflection, runtime, serving
from server.api.credit_servicer import CreditServicer
from server.api.generation_servicer import GenerationServicer
from server.auth.page_key import page_token_key
from server.auth.principal import ServicePrincipal
from server.auth.secret_store import load_or_create_jwt_secret
from server.auth.verifier import TokenVerifier
from server.config import Settings
from server.credit.controls import SpendControls
from server.credit.ledger import CreditLedger
from server.credit.profiles import ProfileKeeper
from server.credit.sweeper import HoldSweeper
from server.db import embedded, migrate
from server.db.watch import DatabaseWatch
from server.domain.paging import PageTokens, page_budget
from server.edges.calls import Calls
from server.edges.connect import applications as connect_applications
from server.edges.cors import Cors
from server.edges.http import HEALTH_PATH, HttpEdge
from server.edges.http_server import HttpServer, TlsFiles
from server.errors import ServiceCredentialsRejected
from server.events.feed import BalanceFeed
from server.events.service import Events
from server.events.webhooks import DeliveryPool, DeliverySettings
from server.generation import catalogue as catalogue_file
from server.generation.feed import ChangeFeed
from server.generation.lifecycle import Generations, Limits
from server.generation.models import ModelSpec
from server.generation.worker import Worker, WorkerPool, WorkerSettings, load_providers
from server.health import HealthServicer
from server.interceptors import CallInterceptor
from server.interceptors.auth import is_public
from server.observability import metrics, tracing
from server.repository.breaker import CredentialBreaker
from server.repository.credits import CreditRepository
from server.repository.events import EventRepository
from server.repository.generations import GenerationRepository
from server.repository.layered import LayeredRepository
from server.repository.transport import Transport
from server.tls import server_credentials
from server.transports.change_feed import PostgresChangeFeed
from server.transports.postgres import PostgresTransport
from server.transports.supabase import SupabaseTransport

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    credit_service_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name,
    generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
)


class ConfigurationError(Exception):
    """The settings cannot work; the message says what to change."""


@dataclasses.dataclass
class Backend:
    """What the API and the workers share: the database side, the repositories, the catalogue,
    the change feed, and the watch on the database (started by whoever serves)."""

    settings: Settings
    transport: Transport
    database: embedded.EmbeddedPostgres | None
    credits: CreditRepository
    generations: GenerationRepository
    catalogue: Mapping[str, ModelSpec]
    feed: ChangeFeed
    watch: DatabaseWatch
    events: EventRepository
    # Balance changes as they commit (live on PostgreSQL; polled on a Supabase project).
    balances: BalanceFeed

    async def close(self) -> None:
        await self.watch.stop()  # first: a database being stopped is not to be restarted
        await self.feed.close()
        await self.transport.close()
        if self.database is not None:
            await self.database.astop()


@dataclasses.dataclass
class Application:
    """A started service: its gRPC server (and HTTP edge), health, background jobs and
    backend."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    backend: Backend
    sweeper: HoldSweeper
    workers: WorkerPool
    deliveries: DeliveryPool
    events: Events
    metrics: WSGIServer | None = None
    queue_tracker: asyncio.Task[None] | None = None
    generations: Generations | None = None
    # The Connect edge (CREDITS_HTTP_LISTEN), when on.
    http: HttpServer | None = None
    # Tracing, when this service turned it on (OTEL_EXPORTER_OTLP_ENDPOINT).
    traces: tracing.Tracing | None = None

    @property
    def http_port(self) -> int | None:
        """The Connect edge's port (None: off)."""
        return self.http.port if self.http is not None else None

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, end open watches, let in-flight RPCs and generations finish
        within `grace`, then stop the background jobs and the database."""
        await self.health.enter_graceful_shutdown()
        if self.generations is not None:
            self.generations.stop()  # open watches end now (SERVER_STOPPING), not after grace
        self.events.stop()
        # The HTTP edge stops beside the gRPC server, with the same grace.
        http = asyncio.create_task(self.http.stop(grace)) if self.http is not None else None
        # In-flight RPCs and generations both get the grace period, side by side.
        await asyncio.gather(
            self.server.stop(grace), self.workers.stop(grace), self.deliveries.stop(grace)
        )
        if http is not None:
            await http
        if self.queue_tracker is not None:
            await runtime.stop(self.queue_tracker)
        await self.sweeper.stop()
        await self.backend.close()
        if self.traces is not None:
            await asyncio.to_thread(self.traces.stop)  # its last spans are sent
        if self.metrics is not None:
            # shutdown() waits for the serving thread's loop (it polls every half second).
            await asyncio.to_thread(self.metrics.shutdown)
            self.metrics.server_close()


def resolve(settings: Settings) -> Settings:
    """Settings checked, and completed for embedded mode (its JWT secret lives in the data
    dir), with the key that signs page tokens settled (server/auth/page_key.py)."""
    if settings.uses_supabase_api:
        missing = [
            name
            for name, value in (
                ("SUPABASE_ANON_KEY", settings.supabase_anon_key),
                ("SUPABASE_SERVICE_ROLE_KEY", settings.supabase_service_role_key),
            )
            if not value
        ]
        if missing:
            raise ConfigurationError(f"SUPABASE_URL is set: set {' and '.join(missing)} too")
    settings = dataclasses.replace(settings, page_token_key=page_token_key(settings))
    if settings.embedded and not settings.jwt_secret:
        secret = load_or_create_jwt_secret(settings.data_dir)
        return dataclasses.replace(settings, jwt_secret=secret)
    if not settings.jwt_secret and not settings.jwks_url:
        raise ConfigurationError(
            "no way to verify tokens: set SUPABASE_JWT_SECRET or CREDITS_JWKS_URL"
        )
    return settings


def page_tokens(settings: Settings) -> PageTokens:
    """The signer of the listings' page tokens, with the key `resolve` settled on."""
    key = settings.page_token_key
    return PageTokens(key.encode()) if key else PageTokens.ephemeral()


def generation_limits(settings: Settings) -> Limits:
    """What a generation request may carry, and what a page of them may take of a response."""
    return Limits(
        max_prompt_bytes=settings.max_prompt_bytes,
        max_parameters_bytes=settings.max_parameters_bytes,
        max_page_bytes=page_budget(settings.max_send_message_bytes),
    )


def token_verifier(settings: Settings) -> TokenVerifier:
    """How tokens are verified for `settings` (resolved)."""
    return TokenVerifier.from_settings(settings)


async def connect(
    settings: Settings, url: str | None, pool_size: int
) -> PostgresTransport | SupabaseTransport:
    """The transport to the Supabase project the settings name, or to the PostgreSQL at
    `url` (the embedded one, or DATABASE_URL)."""
    project = settings.supabase_project
    timeout = settings.db_timeout_seconds
    if project is not None:
        return SupabaseTransport.connect(project, timeout=timeout)
    assert url is not None
    return await PostgresTransport.connect(
        url, min_size=min(2, pool_size), max_size=pool_size, timeout_seconds=timeout
    )


def start_shared_database(settings: Settings) -> tuple[embedded.EmbeddedPostgres | None, Settings]:
    """For several server processes: the embedded PostgreSQL started and migrated once by
    their supervisor (a blocking call), and the settings that point the processes at it."""
    if not settings.embedded:
        return None, settings
    database = embedded.EmbeddedPostgres.start_blocking(settings.data_dir)
    try:
        asyncio.run(migrate.migrate(database.uri))
    except BaseException:
        database.stop()
        raise
    return database, dataclasses.replace(settings, database_url=database.uri)


async def _migrate(url: str, source: str) -> None:
    """The migrations applied to the database at `url`; one that cannot be reached is a
    ConfigurationError naming `source` (never its URL: it may hold a password)."""
    try:
        await migrate.migrate(url)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        raise ConfigurationError(
            f"cannot reach the database at {source}: {type(error).__name__}: {error}"
        ) from None


async def open_store(
    settings: Settings,
) -> tuple[PostgresTransport | SupabaseTransport, embedded.EmbeddedPostgres | None, str | None]:
    """The transport the settings name, the embedded PostgreSQL if this process runs one, and
    the PostgreSQL URL when there is direct access (for LISTEN).

    On PostgreSQL (embedded or DATABASE_URL) the service applies the migrations itself; on a
    Supabase project they are applied with the Supabase CLI (see docs/supabase.md).
    """
    if settings.supabase_project is not None:
        return await connect(settings, None, settings.db_pool_size), None, None
    database = await embedded.start(settings.data_dir) if settings.embedded else None
    url = database.uri if database is not None else settings.database_url
    assert url is not None
    try:
        await _migrate(url, "the embedded PostgreSQL" if database else "DATABASE_URL")
        return await connect(settings, url, settings.db_pool_size), database, url
    except BaseException:
        if database is not None:
            await database.astop()
        raise


async def open_backend(settings: Settings) -> Backend:
    """Open the database side for `settings` (resolved) and bring its configuration up to date:
    signup credits and the model catalogue."""
    catalogue = catalogue_file.load(settings.models_path or catalogue_file.DEFAULT_CATALOGUE)
    transport, database, url = await open_store(settings)
    layers = LayeredRepository(transport, CredentialBreaker(cooldown=settings.breaker_seconds))
    feed: ChangeFeed = PostgresChangeFeed(url) if url else ChangeFeed()
    balances = feed.balances if isinstance(feed, PostgresChangeFeed) else BalanceFeed()
    backend = Backend(
        settings,
        transport,
        database,
        CreditRepository(layers),
        GenerationRepository(layers),
        catalogue,
        feed,
        DatabaseWatch(transport.probe, database),
        EventRepository(layers),
        balances,
    )
    try:
        if isinstance(feed, PostgresChangeFeed):
            await feed.start()
        await backend.credits.configure(
            signup_credits=settings.signup_credits,
            signup_ttl_seconds=settings.signup_credits_ttl_seconds,
        )
        await backend.credits.configure_limits(
            daily=settings.default_daily_limit,
            monthly=settings.default_monthly_limit,
            max_active_generations=settings.max_active_generations,
        )
        await backend.generations.sync_models(list(catalogue.values()))
        await backend.events.configure(
            low_balance_thresholds=settings.low_balance_thresholds,
            expiry_notice_seconds=settings.expiry_notice_seconds,
        )
    except ServiceCredentialsRejected:
        # Users are still served through their own JWTs; the breaker has said why, loudly.
        log.error("configuration not written: the service credentials were rejected")
    except BaseException:
        await backend.close()
        raise
    return backend


def worker_pool(backend: Backend, count: int) -> WorkerPool:
    providers = load_providers(backend.catalogue)
    settings = WorkerSettings(lease_seconds=backend.settings.worker_lease_seconds)
    return WorkerPool(
        [
            Worker(backend.generations, backend.catalogue, providers, backend.feed, settings)
            for _ in range(count)
        ],
        providers.values(),
    )


def delivery_pool(backend: Backend) -> DeliveryPool:
    """The event pump and CREDITS_WEBHOOK_DELIVERERS deliverers; a claim lasts
    CREDITS_WORKER_LEASE_SECONDS, and always longer than one POST may take."""
    settings = backend.settings
    timeout = settings.webhook_timeout_seconds
    return DeliveryPool(
        backend.events,
        settings.webhook_deliverers,
        DeliverySettings(
            timeout_seconds=timeout,
            lease_seconds=max(settings.worker_lease_seconds, int(timeout) + 5),
        ),
    )


async def start(settings: Settings) -> Application:
    """Start the database side, then serve; health turns SERVING once everything is ready."""
    # A port in use is refused at once, before anything starts. The processes of one group
    # share theirs: their supervisor checked it and holds it for them.
    if settings.processes == 1:
        serving.ensure_free(settings.listen)
        if settings.http_listen:
            serving.ensure_free(settings.http_listen)
    if settings.metrics_listen:
        serving.ensure_free(settings.metrics_listen)
    settings = resolve(settings)
    credentials = server_credentials(settings)
    backend = await open_backend(settings)
    traced = None
    try:
        traced = tracing.start()
        workers = worker_pool(backend, settings.workers)
        generations = Generations(
            backend.generations,
            backend.catalogue,
            backend.feed,
            page_tokens(settings),
            generation_limits(settings),
        )
        events = Events(
            backend.events,
            backend.balances,
            max_page_bytes=page_budget(settings.max_send_message_bytes),
        )
        served = servicers(settings, backend, generations, events)
        verifier, keeper = token_verifier(settings), ProfileKeeper(backend.credits)
        interceptor = CallInterceptor(
            verifier, keeper, max_send_bytes=settings.max_send_message_bytes
        )
        server, health = await _grpc_server(settings, served, interceptor)
        try:
            port = (
                server.add_secure_port(settings.listen, credentials)
                if credentials is not None
                else server.add_insecure_port(settings.listen)
            )
        except RuntimeError:  # grpc could not bind: taken since the check above
            raise serving.AddressUnavailable(
                f"cannot listen on {settings.listen}: the address is already in use"
            ) from None
        await server.start()
        try:
            pipeline = Calls(
                verifier, keeper, max_send_bytes=settings.max_send_message_bytes, protocol="connect"
            )
            http = await _http_edge(settings, served, pipeline, health)
        except BaseException:
            await server.stop(None)
            raise
    except BaseException:
        if traced is not None:
            traced.stop()
        await backend.close()
        raise
    app = Application(
        settings,
        server,
        port,
        health,
        backend,
        HoldSweeper(backend.credits),
        workers,
        delivery_pool(backend),
        events,
    )
    app.generations = generations
    app.http = http
    app.traces = traced
    if settings.metrics_listen:
        app.metrics = metrics.serve(settings.metrics_listen)
        app.queue_tracker = asyncio.create_task(
            metrics.track_queue(backend.generations.queue_stats), name="queue-metrics"
        )
    app.sweeper.start()
    app.workers.start()
    app.deliveries.start()
    # What start-up made lives as long as the process: keep the collector from walking it
    # again in every full collection (each one pauses every RPC in flight).
    gc.freeze()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    backend.watch.start(health.follow_database)
    return app


@dataclasses.dataclass(frozen=True)
class Servicers:
    """The two services' servicers, which both edges serve."""

    credits: CreditServicer
    generations: GenerationServicer


def servicers(
    settings: Settings, backend: Backend, generations: Generations, events: Events
) -> Servicers:
    return Servicers(
        CreditServicer(
            CreditLedger(
                backend.credits,
                page_tokens(settings),
                max_page_bytes=page_budget(settings.max_send_message_bytes),
            ),
            events,
            SpendControls(backend.credits),
        ),
        GenerationServicer(generations),
    )


async def _grpc_server(
    settings: Settings, served: Servicers, interceptor: CallInterceptor
) -> tuple[grpc.aio.Server, HealthServicer]:
    """The server with both services, health (NOT_SERVING until told) and reflection."""
    server = serving.GuardedServer(
        grpc.aio.server(
            options=serving.channel_options(settings),
            compression=serving.compression(settings),
            interceptors=tracing.grpc_interceptors(is_public),
        ),
        interceptor,
    )
    credit_service_pb2_grpc.add_CreditServiceServicer_to_server(served.credits, server)
    generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(served.generations, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server
    )
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, health


async def _http_edge(
    settings: Settings, served: Servicers, pipeline: Calls, health: HealthServicer
) -> HttpServer | None:
    """The Connect edge serving both services (with /healthz and CORS) on
    CREDITS_HTTP_LISTEN; None when that is off."""
    if not settings.http_listen:
        return None
    services = connect_applications(
        {
            credit_service_connect.CreditServiceASGIApplication: (
                served.credits,
                credit_service_pb2.DESCRIPTOR.services_by_name["CreditService"],
            ),
            generation_service_connect.GenerationServiceASGIApplication: (
                served.generations,
                generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"],
            ),
        },
        pipeline,
        max_receive_bytes=settings.max_receive_message_bytes,
    )
    edge = HttpEdge(services, health.serving, Cors(settings.http_cors_origins))
    tls = (
        TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if settings.tls_cert and settings.tls_key
        else None
    )
    return await HttpServer.start(
        tracing.asgi(edge, HEALTH_PATH),
        settings.http_listen,
        reuse_port=settings.processes > 1,
        tls=tls,
    )


async def _until_signalled() -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()


async def run_workers(settings: Settings, count: int, grace: float = 10.0) -> None:
    """`credits worker`: generation workers only, until SIGTERM or SIGINT; the jobs in hand
    then get `grace` seconds to finish."""
    traced = tracing.start()
    backend = await open_backend(resolve(settings))
    pool = worker_pool(backend, count)
    pool.start()
    backend.watch.start()  # no health to tell; an embedded PostgreSQL is still restarted
    log.info("credits worker running %d workers", count)
    try:
        await _until_signalled()
    finally:
        await pool.stop(grace)
        await backend.close()
        if traced is not None:
            await asyncio.to_thread(traced.stop)
    log.info("stopped")


async def export_ledger(
    settings: Settings,
    out: TextIO,
    fmt: str,
    *,
    user_id: uuid.UUID | None,
    start: datetime | None,
    end: datetime | None,
) -> int:
    """`credits export`: the ledger (one user's, or every user's with None) to `out`, batch by
    batch, with the service's credentials; returns how many entries it wrote."""
    transport, database, _ = await open_store(resolve(settings))
    try:
        layers = LayeredRepository(transport, CredentialBreaker(cooldown=settings.breaker_seconds))
        batches = await SpendControls(CreditRepository(layers)).export(
            ServicePrincipal(),
            str(user_id or ""),
            all_users=user_id is None,
            start=start,
            end=end,
        )
        return await ledger_export.write(batches, out, fmt)
    finally:
        await transport.close()
        if database is not None:
            await database.astop()


def store_description(settings: Settings, database: embedded.EmbeddedPostgres | None) -> str:
    """Where the data lives, for the "credits serving on" line."""
    if database is not None:
        return f"embedded PostgreSQL in {database.pgdata}"
    return "Supabase API" if settings.uses_supabase_api else "DATABASE_URL"


async def serve(settings: Settings, grace: float = 10.0) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    app = await start(settings)
    host = settings.listen.rsplit(":", 1)[0]
    where = store_description(settings, app.backend.database)
    if app.http_port is not None:
        http_host = settings.http_listen.rsplit(":", 1)[0] if settings.http_listen else host
        where += f"; Connect on {http_host}:{app.http_port}"
    log.info("credits serving on %s:%d (%s)", host, app.port, where)
    await _until_signalled()
    log.info("shutting down")
    await app.stop(grace)
    log.info("stopped")
