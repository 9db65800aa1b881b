"""The outermost interceptor: a request id for every RPC, returned to the caller in the trailing
metadata, and one access-log line and the RPC metrics when it ends (never a token, key or
prompt).

Trailers, not headers: they go out with the status in the call's last batch, where headers of
their own would cost a separate send for every unary call. Error details travel there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import grpc.aio

from server.interceptors.auth import PUBLIC_METHOD_PREFIXES
from server.interceptors.handlers import Context, Handler, wrap
from server.observability import metrics
from server.observability.calls import REQUEST_ID_HEADER, CallRecord, close_call, open_call

log = logging.getLogger("credits.access")

MAX_REQUEST_ID_LENGTH = 128


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """Health checks and reflection are not logged: probes would drown the RPCs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        request_id = request_id_of(handler_call_details.invocation_metadata)
        return wrap(handler, lambda context: _logged(context, CallRecord(request_id, method)))


def request_id_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The caller's `x-request-id` when it is a sane one, otherwise a new id."""
    for key, value in metadata or ():
        if key != REQUEST_ID_HEADER or not isinstance(value, str):
            continue
        if 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isprintable():
            return value
    return uuid.uuid4().hex


@contextlib.asynccontextmanager
async def _logged(context: Context, record: CallRecord) -> AsyncIterator[None]:
    token = open_call(record)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, record.request_id),))
    try:
        yield
    except asyncio.CancelledError:
        record.fail(grpc.StatusCode.CANCELLED, "")
        raise
    finally:
        log.info("rpc %s %s", record.method, record.code.name, extra={"fields": record.fields()})
        metrics.RPCS.labels(record.method, record.code.name).inc()
        metrics.RPC_SECONDS.labels(record.method).observe(record.elapsed())
        close_call(token)
