"""Every method the real server offers, found through its own reflection, refuses a call without
a token, except health checks and reflection: a service registered on the server is guarded
however it was registered."""

from __future__ import annotations

import grpc
import grpc.aio
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import credits.v1.credit_service_pb2
import credits.v1.generation_service_pb2  # noqa: F401
from server.interceptors.auth import is_public
from tests.fixtures.errors import failure


async def offered_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for response in stub.ServerReflectionInfo(iter([request])):
        return [service.name for service in response.list_services_response.service]
    raise AssertionError("reflection answered nothing")


async def test_every_method_but_health_and_reflection_needs_a_token(
    channel: grpc.aio.Channel,
) -> None:
    services = await offered_services(channel)
    assert {"credits.v1.CreditService", "credits.v1.GenerationService"} <= set(services)
    guarded = []
    for name in services:
        for method in descriptor_pool.Default().FindServiceByName(name).methods:
            path = f"/{name}/{method.name}"
            if is_public(path):
                continue
            if method.server_streaming:
                call = channel.unary_stream(path)(b"")
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError as error:
                    refused = failure(error)
                else:
                    raise AssertionError(f"{path} answered without a token")
            else:
                try:
                    await channel.unary_unary(path)(b"")
                except grpc.aio.AioRpcError as error:
                    refused = failure(error)
                else:
                    raise AssertionError(f"{path} answered without a token")
            assert (refused.code, refused.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "TOKEN_MISSING",
            ), path
            guarded.append(path)
    assert "/credits.v1.CreditService/GetBalance" in guarded
    assert "/credits.v1.GenerationService/WatchGeneration" in guarded


async def test_health_answers_without_a_token(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == health_pb2.HealthCheckResponse.SERVING
