"""The access log: a request id for every RPC, and one JSON line and the RPC metrics when it
ends (never a token, key or prompt).

The id comes back to the caller in the trailing metadata: it goes out with the status in the
call's last batch, where headers of its own would cost a separate send for every unary call.
Error details travel there too.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable

from server.observability import metrics
from server.observability.calls import REQUEST_ID_HEADER, CallRecord
from server.observability.logs import ACCESS_LOGGER

log = logging.getLogger(ACCESS_LOGGER)

MAX_REQUEST_ID_LENGTH = 128

# Made ids: a random prefix per process and a counter, 32 hex digits like a UUID's, unique across
# processes and restarts without uuid4's system call for every id.
_prefix = os.urandom(8).hex()
_made = itertools.count(1)


def _new_prefix() -> None:
    global _prefix
    _prefix = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_prefix)


def request_id_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's `x-request-id` when it is a sane one, otherwise a new id."""
    for key, value in metadata or ():
        if key != REQUEST_ID_HEADER or not isinstance(value, str):
            continue
        if 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isprintable():
            return value
    return f"{_prefix}{next(_made):016x}"


def finish(record: CallRecord) -> None:
    """The call is over: its log line and its metrics."""
    code = record.code.name
    log.info("rpc %s %s", record.method, code, extra={"fields": record.fields()})
    metrics.rpc_done(record.method, code, record.elapsed())
    if record.reason:
        metrics.rpc_failed(record.method, record.reason)
