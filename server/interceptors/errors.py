"""Ending a gRPC call with the status the call pipeline (server/edges/calls.py) chose: a domain
error's status and rich details (`grpc-status-details-bin`, by the one error table) in the
trailers with the request id; a status without details as gRPC itself would send it."""

from __future__ import annotations

from server.api import error_table
from server.edges.calls import Failure
from server.interceptors.handlers import Context
from server.observability.calls import REQUEST_ID_HEADER, CallRecord


async def abort(context: Context, record: CallRecord, failure: Failure) -> None:
    """End the call with `failure`; the trailers carry its details and the request id."""
    if failure.error is None:
        await context.abort(failure.code, failure.message)
        return
    status = error_table.to_status(failure.error)
    trailers = (*status.trailing_metadata, (REQUEST_ID_HEADER, record.request_id))
    context.set_trailing_metadata(trailers)
    await context.abort(status.code, status.details)
