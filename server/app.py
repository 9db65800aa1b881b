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
from server.interceptors.auth import AuthInterceptor
from server.interceptors.errors import ErrorInterceptor
from server.repository.breaker import CredentialBreaker
from server.repository.credits import CreditRepository
from server.repository.layered import LayeredRepository
from server.transports.postgres import PostgresTransport

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
    transport: PostgresTransport
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
    """Settings completed for embedded mode (its JWT secret lives in the data dir)."""
    if settings.supabase_url and not settings.database_url:
        raise ConfigurationError(
            "SUPABASE_URL is set, but the Supabase transport is not available yet; "
            "set DATABASE_URL to the project's PostgreSQL connection string instead"
        )
    if settings.embedded and not settings.jwt_secret:
        secret = load_or_create_jwt_secret(settings.data_dir)
        return dataclasses.replace(settings, jwt_secret=secret)
    if not settings.jwt_secret and not settings.jwks_url:
        raise ConfigurationError(
            "no way to verify tokens: set SUPABASE_JWT_SECRET or CREDITS_JWKS_URL"
        )
    return settings


async def start(settings: Settings) -> Application:
    """Start the database side, then serve; health turns SERVING once everything is ready."""
    settings = resolve(settings)
    database = await embedded.start(settings.data_dir) if settings.embedded else None
    url = database.uri if database is not None else settings.database_url
    assert url is not None
    try:
        await migrate.migrate(url)
        transport = await PostgresTransport.connect(url)
    except BaseException:
        if database is not None:
            await database.astop()
        raise

    repository = CreditRepository(LayeredRepository(transport, CredentialBreaker()))
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
    where = f"embedded PostgreSQL in {app.database.pgdata}" if app.database else "DATABASE_URL"
    log.info("credits serving on %s:%d (%s)", host, app.port, where)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down")
    await app.stop(grace)
    log.info("stopped")
