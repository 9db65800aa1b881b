"""Turns what a handler raises into the contract's status: domain errors through the one error
table, anything else into INTERNAL with no internals in the message and a logged traceback."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import grpc.aio

from server import errors
from server.api import error_table
from server.interceptors.handlers import Context, Handler, wrap

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        request_id = _request_id(handler_call_details.invocation_metadata)
        return wrap(handler, lambda context: _reported(context, method, request_id))


def _request_id(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


@contextlib.asynccontextmanager
async def _reported(context: Context, method: str, request_id: str) -> AsyncIterator[None]:
    """Every error the handler raises leaves as a status (an abort is one already)."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except errors.CreditsError as error:
        await _abort(context, error_table.to_status(error), request_id)
    except Exception as error:
        log.error("unexpected error in %s (request %s)", method, request_id, exc_info=error)
        await _abort(context, error_table.to_status(errors.CreditsError()), request_id)


async def _abort(context: Context, status: grpc.Status, request_id: str) -> None:
    context.set_trailing_metadata((*status.trailing_metadata, (REQUEST_ID_HEADER, request_id)))
    await context.abort(status.code, status.details)
