"""Logs as one JSON object per line, for `credits serve` and `credits worker`.

Each line has time, level, logger, message and the process id (several server processes may
share one log), plus the structured fields a record carries in `extra={"fields": {...}}` (the
access log's request id, method, code, duration, principal).

The access log (one line per RPC) goes straight to the batched handler when that is the only
place its lines go, as `credits serve` configures it: the LogRecord and the logging machinery
around it were most of the line's cost. Anywhere else (a handler of its own, a filter, pytest's
capture) its lines are records like any other.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import TextIO

import orjson

# The logger of the per-RPC access lines (server/edges/calls.py).
ACCESS_LOGGER = "credits.access"

# The process id, read once (a system call on every record otherwise) and again after a fork.
_pid = os.getpid()


def _read_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_read_pid)

# What orjson cannot write as json would, and lines orjson writes outside ASCII: json's encoder
# (one for every line: json.dumps with options builds a new one per call).
_ENCODE = json.JSONEncoder(default=str, separators=(",", ":")).encode
# As json does: datetimes and dataclasses through `default` (str), keys that are not strings
# written as strings.
_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_NON_STR_KEYS
)


def _encode(line: dict[str, object]) -> str:
    """`line` as one line of compact JSON in ASCII, as json writes it: by orjson, at a tenth of
    json's cost (an access line per RPC); by json for what orjson refuses (an integer past 64
    bits) and for text beyond ASCII, which json escapes whatever the stream's encoding."""
    try:
        encoded = orjson.dumps(line, default=str, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return _ENCODE(line)
    return encoded.decode() if encoded.isascii() else _ENCODE(line)


@functools.lru_cache(maxsize=4)
def _second(epoch_second: int) -> str:
    return datetime.fromtimestamp(epoch_second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _timestamp(created: float) -> str:
    """ISO 8601 in UTC to the millisecond, as `isoformat(timespec="milliseconds")` writes it;
    the date and time of day are made once a second."""
    second = math.floor(created)
    micros = round((created - second) * 1e6)  # datetime's own rounding, then truncation
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    return f"{_second(second)}.{micros // 1000:03d}+00:00"


def _line(
    created: float, level: str, logger: str, message: str, pid: int, fields: object
) -> dict[str, object]:
    line: dict[str, object] = {
        "time": _timestamp(created),
        "level": level,
        "logger": logger,
        "message": message,
        "pid": pid,
    }
    if isinstance(fields, dict):
        line.update(fields)
    return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = _line(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            _pid if record.process is None else record.process,
            getattr(record, "fields", None),
        )
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return _encode(line)


class BatchedLinesHandler(logging.Handler):
    """Writes the lines of the `batched` loggers (the access log: one per RPC) in batches, from
    a thread of its own every `interval` seconds; any other line, or a warning or worse, at once
    with whatever waits before it; and all on flush (logging flushes its handlers at exit).

    A write per RPC costs the serving thread far more than the line itself: the system call
    hands the GIL to grpc's poller thread and the loop waits to get it back. Batching is what
    nginx's buffered access log does; a SIGKILLed process loses at most `interval` of lines.
    Lines are formatted as they are logged: a record that cannot be formatted is reported on its
    own (logging's handleError) instead of losing its batch, and the writer thread holds the GIL
    only to join and write.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        interval: float = 0.1,
        batched: Collection[str] = (ACCESS_LOGGER,),
    ) -> None:
        super().__init__()
        self._stream = stream if stream is not None else sys.stderr
        self.batched = frozenset(batched)
        self._pending: list[str] = []
        self._writing = threading.Lock()
        self._stopping = threading.Event()
        self._interval = interval
        self._writer = threading.Thread(target=self._write_often, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        # logging calls this under the handler's lock, which flush() takes to swap the batch.
        try:
            self._pending.append(self.format(record))
        except Exception:
            self.handleError(record)
        if record.levelno >= logging.WARNING or record.name not in self.batched:
            self.flush()

    def queue(self, line: str) -> None:
        """Queue a formatted line of a batched logger, for the next batch."""
        self.acquire()
        try:
            self._pending.append(line)
        finally:
            self.release()

    def flush(self) -> None:
        # Always the handler's lock first, then the writing one (emit holds the first when it
        # flushes a warning): batches are taken and written in order, and no two threads wait
        # on each other. Formatting and writing happen outside the handler's lock.
        self.acquire()
        try:
            batch, self._pending = self._pending, []
            self._writing.acquire()
        finally:
            self.release()
        try:
            if batch:
                self._stream.write("\n".join(batch) + "\n")
                self._stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": f"a batch of {len(batch)} lines"}))
        finally:
            self._writing.release()

    def close(self) -> None:
        self._stopping.set()
        if self._writer is not threading.current_thread():
            self._writer.join(timeout=5)
        self.flush()
        super().close()

    def _write_often(self) -> None:
        while not self._stopping.wait(self._interval):
            self.flush()


_access = logging.getLogger(ACCESS_LOGGER)


def access(message: str, fields: dict[str, object]) -> None:
    """Log an access line (INFO, on ACCESS_LOGGER) with its structured `fields`."""
    if not _access.isEnabledFor(logging.INFO):
        return
    direct = _direct_handler()
    if direct is None:
        _access.info(message, extra={"fields": fields})
        return
    line = _line(time.time(), "info", ACCESS_LOGGER, message, _pid, fields)
    try:
        direct.queue(_encode(line))
    except Exception:
        direct.handleError(logging.makeLogRecord({"msg": message}))


def _direct_handler() -> BatchedLinesHandler | None:
    """The batched handler formatting with JsonFormatter when it is the one handler an access
    line reaches and nothing filters it; None otherwise."""
    if _access.filters:
        return None
    found: list[logging.Handler] = []
    logger: logging.Logger | None = _access
    while logger is not None:
        found += logger.handlers
        if len(found) > 1 or not logger.propagate:
            break
        logger = logger.parent
    if len(found) != 1:
        return None
    [handler] = found
    if (
        type(handler) is not BatchedLinesHandler
        or type(handler.formatter) is not JsonFormatter
        or handler.filters
        or handler.level > logging.INFO
        or ACCESS_LOGGER not in handler.batched
    ):
        return None
    return handler


def configure(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the whole process."""
    # Records need no caller position nor thread or multiprocessing names (the lines show
    # none), and the formatter knows the pid: the logging docs' own optimisations, worth it at
    # one record per RPC.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    handler = BatchedLinesHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # httpx logs every request of the Supabase transport at INFO: noise, not events.
    logging.getLogger("httpx").setLevel(logging.WARNING)
