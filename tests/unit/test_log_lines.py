"""The batched JSON-lines handler: every line written once, in order, from many threads at once
(warnings flushing on the spot while the writer thread flushes too), and nothing left behind at
close."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from server.observability import logs
from server.observability.logs import ACCESS_LOGGER, BatchedLinesHandler, JsonFormatter

# The writer thread failing is a failure here, not a warning.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture
def logger() -> logging.Logger:
    named = logging.getLogger("tests.log_lines")
    named.propagate = False
    named.setLevel(logging.INFO)
    return named


@contextlib.contextmanager
def attached(
    stream: io.StringIO,
    batched: logging.Logger,
    *others: logging.Logger,
    interval: float = 3600,
    formatter: logging.Formatter | None = None,
) -> Iterator[BatchedLinesHandler]:
    """A handler writing to `stream`, batching `batched`'s lines, on it and on `others`; closed
    (so flushed) at the end."""
    handler = BatchedLinesHandler(stream, interval=interval, batched=[batched.name])
    handler.setFormatter(formatter or JsonFormatter())
    for named in (batched, *others):
        named.addHandler(handler)
    try:
        yield handler
    finally:
        for named in (batched, *others):
            named.removeHandler(handler)
        handler.close()


def messages(stream: io.StringIO) -> list[object]:
    return [json.loads(line)["message"] for line in stream.getvalue().splitlines()]


def test_lines_from_many_threads_are_all_written_in_order(logger: logging.Logger) -> None:
    stream = io.StringIO()
    per_thread = 400

    def emit(thread: int) -> None:
        for n in range(per_thread):
            # Every tenth line a warning: it flushes from this thread, racing the writer's.
            level = logging.WARNING if n % 10 == 0 else logging.INFO
            logger.log(level, "line", extra={"fields": {"thread": thread, "n": n}})

    threads = [threading.Thread(target=emit, args=(t,)) for t in range(6)]
    with attached(stream, logger, interval=0.001):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a logging thread hung"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 6 * per_thread
    for thread in range(6):
        assert [line["n"] for line in lines if line["thread"] == thread] == list(range(per_thread))


def test_a_warning_is_written_at_once_and_info_by_the_next_flush(logger: logging.Logger) -> None:
    stream = io.StringIO()
    with attached(stream, logger):
        logger.info("first")
        assert stream.getvalue() == ""
        logger.warning("second")
        assert messages(stream) == ["first", "second"]
        logger.info("third")
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "third"


@pytest.mark.parametrize(
    "created",
    [0.0, 1.9999996, 1.0005, 1_700_000_000.123456, 2_695_163_021.0179996, 4_000_000_000.9999999],
)
def test_line_times_are_written_as_datetime_writes_them(created: float) -> None:
    record = logging.LogRecord("x", logging.INFO, "", 0, "message", None, None)
    record.created = created
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert json.loads(JsonFormatter().format(record))["time"] == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": "r-1", "duration_ms": 0.125, "ok": True, "none": None},
        {"at": datetime(2026, 12, 5, 1, 2, 3, tzinfo=UTC), "id": uuid.UUID(int=7), 3: "key"},
        {"request_id": "caf\u00e9 \U0001f600 \u2028", "quote": '"\\\n'},
        {"amount": 123456789012345678901234567890, "nested": {"list": [1, 2.5, "x"]}},
    ],
    ids=["plain", "datetime-uuid-int-key", "beyond-ascii", "big-int"],
)
def test_lines_hold_what_json_would_write_in_ascii_on_one_line(fields: dict[Any, Any]) -> None:
    record = logging.makeLogRecord({"msg": "m", "levelno": logging.INFO, "fields": fields})
    line = JsonFormatter().format(record)
    assert line.isascii()
    assert "\n" not in line
    written = json.loads(line)
    assert {key: written[key] for key in map(str, fields)} == json.loads(
        json.dumps({str(key): value for key, value in fields.items()}, default=str)
    )


def test_lines_of_other_loggers_are_written_at_once(logger: logging.Logger) -> None:
    stream = io.StringIO()
    lifecycle = logging.getLogger("tests.log_lines.lifecycle")
    lifecycle.propagate = False
    with attached(stream, logger, lifecycle):
        logger.info("an access line")
        lifecycle.info("serving")
        # The lifecycle line is out at once, and the waiting access line before it.
        assert messages(stream) == ["an access line", "serving"]


class FailingOnce(io.StringIO):
    """A stream whose first write fails, as a full disk or a closed pipe would."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def write(self, text: str) -> int:
        if not self.failed:
            self.failed = True
            raise OSError("no space left on device")
        return super().write(text)


def test_a_failed_write_is_reported_and_later_lines_still_go_out(
    logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = FailingOnce()
    with attached(stream, logger):
        logger.warning("lost")
        logger.warning("kept")
    assert "no space left on device" in capsys.readouterr().err
    assert messages(stream) == ["kept"]


class Picky(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.msg == "unformattable":
            raise ValueError("cannot format this one")
        return super().format(record)


def test_a_line_that_cannot_be_formatted_is_reported_and_the_others_are_written(
    logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = io.StringIO()
    with attached(stream, logger, formatter=Picky()):
        logger.info("before")
        logger.info("unformattable")
        logger.info("after")
    assert "cannot format this one" in capsys.readouterr().err
    assert messages(stream) == ["before", "after"]


@contextlib.contextmanager
def access_handlers(*streams: io.StringIO, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """The access logger with a batched handler per stream and no other (pytest attaches its
    capture handlers to every logger that does not propagate), as `credits serve` gives the
    root one; each handler closed (so flushed) at the end."""
    named = logging.getLogger(ACCESS_LOGGER)
    saved = named.propagate, named.level, named.handlers
    handlers = [BatchedLinesHandler(stream, interval=3600) for stream in streams]
    for handler in handlers:
        handler.setFormatter(JsonFormatter())
    named.propagate, named.handlers = False, list(handlers)
    named.setLevel(level)
    try:
        yield named
    finally:
        named.propagate, named.level, named.handlers = saved
        for handler in handlers:
            handler.close()


ACCESS_FIELDS = {"request_id": "r-1", "method": "/m", "code": "OK", "duration_ms": 1.5}


def test_access_lines_skip_logging_yet_read_as_its_records_would() -> None:
    stream = io.StringIO()
    records: list[logging.LogRecord] = []
    made = logging.getLogRecordFactory()

    def counted(*args: Any, **kwargs: Any) -> logging.LogRecord:
        records.append(made(*args, **kwargs))
        return records[-1]

    with access_handlers(stream) as access_logger:
        logging.setLogRecordFactory(counted)
        try:
            logs.access("rpc /m OK", dict(ACCESS_FIELDS))
        finally:
            logging.setLogRecordFactory(made)
        assert records == []  # no LogRecord made
        # A filter on the logger sends the next line through logging, as a record.
        access_logger.addFilter(lambda record: records.append(record) or True)  # type: ignore[func-returns-value]
        try:
            logs.access("rpc /m OK", dict(ACCESS_FIELDS))
        finally:
            access_logger.filters.clear()
    assert len(records) == 1
    assert records[0].getMessage() == "rpc /m OK"
    direct, through_logging = map(json.loads, stream.getvalue().splitlines())
    assert list(direct) == list(through_logging)
    for key in ("time", "pid"):
        assert type(direct.pop(key)) is type(through_logging.pop(key))
    assert (
        direct
        == through_logging
        == {
            "level": "info",
            "logger": ACCESS_LOGGER,
            "message": "rpc /m OK",
            **ACCESS_FIELDS,
        }
    )


def test_access_lines_reach_every_handler_when_there_are_several() -> None:
    first, second = io.StringIO(), io.StringIO()
    with access_handlers(first, second):
        logs.access("rpc /m OK", dict(ACCESS_FIELDS))
    assert messages(first) == messages(second) == ["rpc /m OK"]


def test_no_access_line_below_the_access_loggers_level() -> None:
    stream = io.StringIO()
    with access_handlers(stream, level=logging.WARNING):
        logs.access("rpc /m OK", dict(ACCESS_FIELDS))
    assert stream.getvalue() == ""
