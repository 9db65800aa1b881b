"""The access log: a request id for every RPC, and one JSON line and the RPC metrics when it
ends (never a token, key or prompt).

The id comes back to the caller in the trailing metadata: it goes out with the status in the
call's last batch, where headers of its own would cost a separate send for every unary call.
Error details travel there too.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from server.observability import metrics
from server.observability.calls import REQUEST_ID_HEADER, CallRecord
from server.observability.logs import ACCESS_LOGGER

log = logging.getLogger(ACCESS_LOGGER)

MAX_REQUEST_ID_LENGTH = 128


def request_id_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The caller's `x-request-id` when it is a sane one, otherwise a new id."""
    for key, value in metadata or ():
        if key != REQUEST_ID_HEADER or not isinstance(value, str):
            continue
        if 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isprintable():
            return value
    return uuid.uuid4().hex


def finish(record: CallRecord) -> None:
    """The call is over: its log line and its metrics."""
    code = record.code.name
    log.info("rpc %s %s", record.method, code, extra={"fields": record.fields()})
    metrics.rpc_done(record.method, code, record.elapsed())
