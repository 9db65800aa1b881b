"""The answer of an RPC that the contract names but this version does not serve yet."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc


async def unimplemented(context: grpc.aio.ServicerContext[Any, Any], what: str) -> NoReturn:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not available yet")
