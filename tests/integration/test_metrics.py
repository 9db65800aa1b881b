"""Prometheus metrics on CREDITS_METRICS_LISTEN, scraped over HTTP from a real server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, generation_service_pb2_grpc
from credits.v1 import generation_service_pb2 as gpb
from server import app as application
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.server import SERVICE, new_user, settings_for

GET_BALANCE = "/credits.v1.CreditService/GetBalance"
DEBIT = "/credits.v1.CreditService/DebitCredits"


@pytest.fixture
async def observed(
    database_url: str, supabase: FakeSupabase
) -> AsyncIterator[application.Application]:
    settings = dataclasses.replace(
        settings_for("postgres", database_url, supabase), metrics_listen="127.0.0.1:0"
    )
    app = await application.start(settings)
    try:
        yield app
    finally:
        await app.stop(grace=1)


async def scrape(app: application.Application) -> dict[tuple[str, tuple[str, ...]], float]:
    """Every sample, keyed by (name, sorted label values)."""
    assert app.metrics is not None
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{app.metrics.server_port}/metrics")
    response.raise_for_status()
    return {
        (sample.name, tuple(v for _, v in sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


async def test_rpcs_are_counted_by_method_and_code_and_timed(
    observed: application.Application,
) -> None:
    before = await scrape(observed)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{observed.port}") as channel:
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        user = new_user()
        for _ in range(3):
            await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.DebitCredits(
                pb.DebitCreditsRequest(amount=1, idempotency_key="k"), metadata=user.metadata
            )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetBalance(pb.GetBalanceRequest(), metadata=SERVICE)
        grant = pb.GrantCreditsRequest(user_id=user.user_id, amount=5, idempotency_key="g")
        for _ in range(2):
            await stub.GrantCredits(grant, metadata=SERVICE)
        await stub.DebitCredits(
            pb.DebitCreditsRequest(amount=2, idempotency_key="d"), metadata=user.metadata
        )
    after = await scrape(observed)

    def grew(name: str, labels: tuple[str, ...]) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    # Labels in name order: code, method, protocol.
    assert grew("credits_rpcs_total", ("OK", GET_BALANCE, "grpc")) == 3
    assert grew("credits_rpcs_total", ("FAILED_PRECONDITION", DEBIT, "grpc")) == 1
    assert grew("credits_rpcs_total", ("INVALID_ARGUMENT", GET_BALANCE, "grpc")) == 1
    assert grew("credits_rpc_seconds_count", (GET_BALANCE, "grpc")) == 4
    # Labels in name order: method, reason; calls that succeed count no error.
    assert grew("credits_rpc_errors_total", (DEBIT, "INSUFFICIENT_CREDITS")) == 1
    assert grew("credits_rpc_errors_total", (GET_BALANCE, "INVALID_ARGUMENT")) == 1
    assert sum(grew(*key) for key in after if key[0] == "credits_rpc_errors_total") == 2
    assert grew("credits_ledger_operations_total", ("grant", "false")) == 1
    assert grew("credits_ledger_operations_total", ("grant", "true")) == 1
    assert grew("credits_ledger_operations_total", ("debit", "false")) == 1
    assert after[("credits_db_pool_connections", ("open",))] >= 1
    assert ("credits_service_layer_breaker_open", ()) in after


async def test_metrics_stop_with_the_server(database_url: str, supabase: FakeSupabase) -> None:
    settings = dataclasses.replace(
        settings_for("postgres", database_url, supabase), metrics_listen="127.0.0.1:0"
    )
    app = await application.start(settings)
    assert app.metrics is not None
    port = app.metrics.server_port
    await app.stop(grace=1)
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/metrics")


async def test_the_generation_queue_is_measured(observed: application.Application) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{observed.port}") as channel:
        credits = credit_service_pb2_grpc.CreditServiceStub(channel)
        generations = generation_service_pb2_grpc.GenerationServiceStub(channel)
        user = new_user()
        await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
        await credits.GrantCredits(
            pb.GrantCreditsRequest(user_id=user.user_id, amount=50, idempotency_key="seed"),
            metadata=SERVICE,
        )
        created = []
        for i in range(3):
            reply = await generations.CreateGeneration(
                gpb.CreateGenerationRequest(model="test-image", prompt="p", request_id=f"q{i}"),
                metadata=user.metadata,
            )
            created.append(reply.generation.generation_id)
        try:
            # No workers run in test servers: the three wait, and the gauges say so.
            for _ in range(50):
                samples = await scrape(observed)
                if samples[("credits_generation_queue", ("queued",))] >= 3:
                    break
                await asyncio.sleep(0.2)
            assert samples[("credits_generation_queue", ("queued",))] >= 3
            assert samples[("credits_generation_oldest_queued_seconds", ())] > 0
        finally:
            for generation_id in created:
                await generations.CancelGeneration(
                    gpb.CancelGenerationRequest(generation_id=generation_id),
                    metadata=user.metadata,
                )
