"""GenerationService over gRPC: requests to domain calls, results to responses, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from credits.v1 import generation_service_pb2 as pb
from credits.v1 import generation_service_pb2_grpc
from server.api import convert
from server.auth.principal import current_principal
from server.generation.lifecycle import Generations

Context = grpc.aio.ServicerContext[Any, Any]


class GenerationServicer(generation_service_pb2_grpc.GenerationServiceServicer):
    def __init__(self, generations: Generations) -> None:
        self._generations = generations

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model(m) for m in self._generations.models()])

    async def CreateGeneration(
        self, request: pb.CreateGenerationRequest, context: Context
    ) -> pb.CreateGenerationResponse:
        generation = await self._generations.create(
            current_principal(),
            request.user_id,
            model=request.model,
            prompt=request.prompt,
            parameters=request.parameters,
            request_id=request.request_id,
        )
        return pb.CreateGenerationResponse(generation=convert.generation(generation))

    async def GetGeneration(
        self, request: pb.GetGenerationRequest, context: Context
    ) -> pb.GetGenerationResponse:
        generation = await self._generations.get(current_principal(), request.generation_id)
        return pb.GetGenerationResponse(generation=convert.generation(generation))

    async def ListGenerations(
        self, request: pb.ListGenerationsRequest, context: Context
    ) -> pb.ListGenerationsResponse:
        page = await self._generations.list(
            current_principal(), request.user_id, request.page_size, request.page_token
        )
        return pb.ListGenerationsResponse(
            generations=[convert.generation(g) for g in page.generations],
            next_page_token=page.next_page_token,
        )

    async def CancelGeneration(
        self, request: pb.CancelGenerationRequest, context: Context
    ) -> pb.CancelGenerationResponse:
        generation = await self._generations.cancel(current_principal(), request.generation_id)
        return pb.CancelGenerationResponse(generation=convert.generation(generation))

    async def WatchGeneration(
        self, request: pb.WatchGenerationRequest, context: Context
    ) -> AsyncIterator[pb.WatchGenerationResponse]:
        async for generation in self._generations.watch(current_principal(), request.generation_id):
            yield pb.WatchGenerationResponse(generation=convert.generation(generation))
