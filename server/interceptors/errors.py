"""Turns what a handler raises into the contract's status: domain errors through the one error
table, anything else into INTERNAL with no internals in the message and a logged traceback."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio

from server import errors
from server.api import error_table
from server.interceptors.handlers import Context, Handler, wrap
from server.observability.calls import REQUEST_ID_HEADER, current_call

log = logging.getLogger(__name__)


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
        return wrap(handler, lambda context: _reported(context, method))


@contextlib.asynccontextmanager
async def _reported(context: Context, method: str) -> AsyncIterator[None]:
    """Every error the handler raises leaves as a status (an abort is one already)."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except errors.CreditsError as error:
        await abort(context, error)
    except Exception as error:
        record = current_call()
        request_id = record.request_id if record else "-"
        log.error("unexpected error in %s (request %s)", method, request_id, exc_info=error)
        await abort(context, errors.CreditsError())


async def abort(context: Context, error: errors.CreditsError) -> None:
    """End the call with `error`'s status, noted on the call's record; the trailers carry the
    error details and the request id."""
    status = error_table.to_status(error)
    trailers = tuple(status.trailing_metadata)
    record = current_call()
    if record is not None:
        record.fail(status.code, error.reason)
        trailers += ((REQUEST_ID_HEADER, record.request_id),)
    context.set_trailing_metadata(trailers)
    await context.abort(status.code, status.details)
