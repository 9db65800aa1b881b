"""Server reflection on the real server, as grpcurl uses it: services listed, and the file of a
service, a message or a method found by its name."""

from __future__ import annotations

import grpc.aio
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


async def ask(
    channel: grpc.aio.Channel, request: Request
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    async for response in stub.ServerReflectionInfo(iter([request])):
        assert isinstance(response, Response)
        return response
    raise AssertionError("reflection answered nothing")


def first_file(response: Response) -> str:
    files = response.file_descriptor_response.file_descriptor_proto
    assert files, response
    return descriptor_pb2.FileDescriptorProto.FromString(files[0]).name


async def test_services_are_listed(channel: grpc.aio.Channel) -> None:
    response = await ask(channel, Request(list_services=""))
    assert {service.name for service in response.list_services_response.service} == {
        "credits.v1.CreditService",
        "credits.v1.GenerationService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_a_method_is_found_in_its_service_file(channel: grpc.aio.Channel) -> None:
    for symbol, file in [
        ("credits.v1.CreditService.GetBalance", "credits/v1/credit_service.proto"),
        ("credits.v1.GenerationService.WatchGeneration", "credits/v1/generation_service.proto"),
        ("credits.v1.CreditService", "credits/v1/credit_service.proto"),
        ("credits.v1.GetBalanceRequest", "credits/v1/credit_service.proto"),
    ]:
        request = Request(file_containing_symbol=symbol)
        response = await ask(channel, request)
        assert first_file(response) == file, symbol
        assert response.original_request == request


async def test_an_unknown_symbol_is_not_found(channel: grpc.aio.Channel) -> None:
    for symbol in ("credits.v1.CreditService.NoSuchMethod", "credits.v1.NoSuchService.Get"):
        response = await ask(channel, Request(file_containing_symbol=symbol))
        assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], symbol
