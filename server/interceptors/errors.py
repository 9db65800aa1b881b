"""Ending a call with an error: domain errors through the one error table, a response too large
to send as gRPC itself ends it, anything else as INTERNAL with no internals in the message (and
its traceback in the log)."""

from __future__ import annotations

import logging

import grpc

from server import errors
from server.api import error_table
from server.interceptors.handlers import Context
from server.observability.calls import REQUEST_ID_HEADER, current_call

log = logging.getLogger(__name__)


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


class ResponseTooLarge(Exception):
    """A response is larger than the server may send (CREDITS_MAX_SEND_MESSAGE_BYTES)."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"Sent message larger than max ({size} vs. {limit})")


async def abort_too_large(context: Context, error: ResponseTooLarge) -> None:
    """End the call as gRPC ends one whose response is too large (RESOURCE_EXHAUSTED, its
    message, no ErrorInfo), noted on the call's record; the request id still goes back."""
    record = current_call()
    if record is not None:
        record.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "")
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))


async def abort_unexpected(context: Context, method: str, error: BaseException) -> None:
    """End the call as INTERNAL after a bug or an unexpected library error."""
    record = current_call()
    request_id = record.request_id if record else "-"
    log.error("unexpected error in %s (request %s)", method, request_id, exc_info=error)
    await abort(context, errors.CreditsError())
