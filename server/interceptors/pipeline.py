"""The interceptor every RPC but health checks and reflection passes: a request id, the caller
verified once and bound as a Principal, errors turned into the contract's statuses, and one
access-log line at the end.

One wrapper per call for all four: each layer of its own cost a coroutine, a rebuilt handler
and a context manager per call, a large part of a unary RPC's time here. Rejections are
handlers of the same kind (unary/streaming) as the real one, so streaming RPCs end with a proper
status and `grpc-status-details-bin` too (the grpc.aio pitfall); they never parse the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio

from server import errors
from server.auth.principal import Principal, reset_principal, set_principal
from server.auth.verifier import TokenVerifier
from server.interceptors import access_log
from server.interceptors.auth import authorization, is_public
from server.interceptors.errors import abort, abort_unexpected
from server.interceptors.handlers import Behaviour, Context, Handler, rebuild, wrap
from server.observability.calls import REQUEST_ID_HEADER, CallRecord, close_call, open_call

log = logging.getLogger(__name__)


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_public(method):
            return handler
        metadata = handler_call_details.invocation_metadata
        record = CallRecord(access_log.request_id_of(metadata), method)
        try:
            principal = await self._verifier.authenticate(authorization(metadata))
        except errors.CreditsError as err:
            log.info("rejected %s: %s", method, err.reason)
            return rebuild(handler, _rejection(record, err), serializers=False)
        except Exception:
            log.exception("authentication of %s failed unexpectedly", method)
            return rebuild(handler, _rejection(record, errors.CreditsError()), serializers=False)
        record.identify(principal)
        return wrap(handler, lambda context: _served(context, record, principal))


@contextlib.asynccontextmanager
async def _served(
    context: Context, record: CallRecord, principal: Principal
) -> AsyncIterator[None]:
    """The handler's run: the record and principal bound, what it raises made a status."""
    call = open_call(record)
    bound = set_principal(principal)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, record.request_id),))
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except errors.CreditsError as error:
        await abort(context, error)
    except asyncio.CancelledError:
        record.fail(grpc.StatusCode.CANCELLED, "")
        raise
    except Exception as error:
        await abort_unexpected(context, record.method, error)
    finally:
        access_log.finish(record)
        # An abandoned async generator is closed later from another context, where neither
        # was set: nothing to undo there.
        with contextlib.suppress(ValueError):
            reset_principal(bound)
            close_call(call)


def _rejection(record: CallRecord, err: errors.CreditsError) -> Behaviour:
    """A behaviour that ends the call with `err`'s status (a coroutine fits all four kinds)."""

    async def reject(request: object, context: Context) -> None:
        call = open_call(record)
        try:
            await abort(context, err)
        finally:
            access_log.finish(record)
            close_call(call)

    return reject
