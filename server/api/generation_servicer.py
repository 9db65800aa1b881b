"""GenerationService: every RPC answers UNIMPLEMENTED until the generation lifecycle lands.

Served now so that stubs, reflection and auth cover the whole API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from credits.v1 import generation_service_pb2 as pb
from credits.v1 import generation_service_pb2_grpc
from server.api.unimplemented import unimplemented

Context = grpc.aio.ServicerContext[Any, Any]


class GenerationServicer(generation_service_pb2_grpc.GenerationServiceServicer):
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> Any:
        await unimplemented(context, "GenerationService")

    async def CreateGeneration(self, request: pb.CreateGenerationRequest, context: Context) -> Any:
        await unimplemented(context, "GenerationService")

    async def GetGeneration(self, request: pb.GetGenerationRequest, context: Context) -> Any:
        await unimplemented(context, "GenerationService")

    async def ListGenerations(self, request: pb.ListGenerationsRequest, context: Context) -> Any:
        await unimplemented(context, "GenerationService")

    async def CancelGeneration(self, request: pb.CancelGenerationRequest, context: Context) -> Any:
        await unimplemented(context, "GenerationService")

    async def WatchGeneration(
        self, request: pb.WatchGenerationRequest, context: Context
    ) -> AsyncIterator[pb.WatchGenerationResponse]:
        await unimplemented(context, "GenerationService")
        yield pb.WatchGenerationResponse()
