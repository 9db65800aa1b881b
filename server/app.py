"""The composition root: builds the service from its settings, serves it, and shuts it down."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from credits.v1 import (
    credit_service_pb2,
    credit_service_pb2_grpc,
    generation_service_pb2,
    generation_service_pb2_grpc,
)
from server.api.credit_servicer import CreditServicer
from server.api.generation_servicer import GenerationServicer
from server.auth.secret_store import load_or_create_jwt_secret
from server.auth.verifier import TokenVerifier
from server.config import Settings
from server.credit.ledger import CreditLedger
from server.credit.sweeper import HoldSweeper
from server.db import embedded, migrate
from server.errors import ServiceCredentialsRejected
from server.interceptors.auth import AuthInterceptor
from server.interceptors.errors import ErrorInterceptor
from server.repository.breaker import CredentialBreaker
from server.repository.credits import CreditRepository
from server.repository.layered import LayeredRepository
from server.repository.transport import Transport
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
class Application:
    """A started service: its gRPC server, health, database transport and embedded database."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    transport: Transport
    database: embedded.EmbeddedPostgres | None
    sweeper: HoldSweeper

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish, then close the database."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.sweeper.stop()
        await self.transport.close()
        if self.database is not None:
            await self.database.astop()


def resolve(settings: Settings) -> Settings:
    """Settings checked, and completed for embedded mode (its JWT secret lives in the data
    dir)."""
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
    if settings.embedded and not settings.jwt_secret:
        secret = load_or_create_jwt_secret(settings.data_dir)
        return dataclasses.replace(settings, jwt_secret=secret)
    if not settings.jwt_secret and not settings.jwks_url:
        raise ConfigurationError(
            "no way to verify tokens: set SUPABASE_JWT_SECRET or CREDITS_JWKS_URL"
        )
    return settings


async def open_store(settings: Settings) -> tuple[Transport, embedded.EmbeddedPostgres | None]:
    """The transport the settings name, and the embedded PostgreSQL if this process runs one.

    On PostgreSQL (embedded or DATABASE_URL) the service applies the migrations itself; on a
    Supabase project they are applied with the Supabase CLI (see the README).
    """
    if settings.uses_supabase_api:
        # resolve() made sure these are set.
        assert settings.supabase_url is not None
        assert settings.supabase_anon_key is not None
        assert settings.supabase_service_role_key is not None
        transport = SupabaseTransport.connect(
            settings.supabase_url,
            anon_key=settings.supabase_anon_key,
            service_key=settings.supabase_service_role_key,
        )
        return transport, None
    database = await embedded.start(settings.data_dir) if settings.embedded else None
    url = database.uri if database is not None else settings.database_url
    assert url is not None
    try:
        await migrate.migrate(url)
        return await PostgresTransport.connect(url), database
    except BaseException:
        if database is not None:
            await database.astop()
        raise


async def start(settings: Settings) -> Application:
    """Start the database side, then serve; health turns SERVING once everything is ready."""
    settings = resolve(settings)
    transport, database = await open_store(settings)
    breaker = CredentialBreaker(cooldown=settings.breaker_seconds)
    repository = CreditRepository(LayeredRepository(transport, breaker))
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(TokenVerifier.from_settings(settings)), ErrorInterceptor()]
    )
    credit_service_pb2_grpc.add_CreditServiceServicer_to_server(
        CreditServicer(CreditLedger(repository)), server
    )
    generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(), server
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(settings.listen)
    await server.start()
    sweeper = HoldSweeper(repository)
    app = Application(settings, server, port, health, transport, database, sweeper)
    try:
        await repository.configure(signup_credits=settings.signup_credits)
    except ServiceCredentialsRejected:
        # Users are still served through their own JWTs; the breaker has said why, loudly.
        log.error("CREDITS_SIGNUP_CREDITS not applied: the service credentials were rejected")
    except BaseException:
        await app.stop(grace=0)
        raise
    sweeper.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return app


async def serve(settings: Settings, grace: float = 10.0) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    app = await start(settings)
    host = settings.listen.rsplit(":", 1)[0]
    if app.database is not None:
        where = f"embedded PostgreSQL in {app.database.pgdata}"
    else:
        where = "Supabase API" if settings.uses_supabase_api else "DATABASE_URL"
    log.info("credits serving on %s:%d (%s)", host, app.port, where)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down")
    await app.stop(grace)
    log.info("stopped")
