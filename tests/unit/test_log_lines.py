"""The batched JSON-lines handler: every line written once, in order, from many threads at once
(warnings flushing on the spot while the writer thread flushes too), and nothing left behind at
close."""

from __future__ import annotations

import io
import json
import logging
import threading
from datetime import UTC, datetime

import pytest

from server.observability.logs import BatchedLinesHandler, JsonFormatter

# The writer thread failing is a failure here, not a warning.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture
def logger() -> logging.Logger:
    named = logging.getLogger("tests.log_lines")
    named.propagate = False
    named.setLevel(logging.INFO)
    return named


def test_lines_from_many_threads_are_all_written_in_order(logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = BatchedLinesHandler(stream, interval=0.001, batched=[logger.name])
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    per_thread = 400

    def emit(thread: int) -> None:
        for n in range(per_thread):
            # Every tenth line a warning: it flushes from this thread, racing the writer's.
            level = logging.WARNING if n % 10 == 0 else logging.INFO
            logger.log(level, "line", extra={"fields": {"thread": thread, "n": n}})

    threads = [threading.Thread(target=emit, args=(t,)) for t in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a logging thread hung"
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 6 * per_thread
    for thread in range(6):
        assert [line["n"] for line in lines if line["thread"] == thread] == list(range(per_thread))


def test_a_warning_is_written_at_once_and_info_by_the_next_flush(logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = BatchedLinesHandler(stream, interval=3600, batched=[logger.name])
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        logger.info("first")
        assert stream.getvalue() == ""
        logger.warning("second")
        assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == [
            "first",
            "second",
        ]
        logger.info("third")
    finally:
        logger.removeHandler(handler)
        handler.close()
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


def test_lines_of_other_loggers_are_written_at_once(logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = BatchedLinesHandler(stream, interval=3600, batched=[logger.name])
    handler.setFormatter(JsonFormatter())
    lifecycle = logging.getLogger("tests.log_lines.lifecycle")
    lifecycle.propagate = False
    for named in (logger, lifecycle):
        named.addHandler(handler)
    try:
        logger.info("an access line")
        lifecycle.info("serving")
        # The lifecycle line is out at once, and the waiting access line before it.
        assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == [
            "an access line",
            "serving",
        ]
    finally:
        for named in (logger, lifecycle):
            named.removeHandler(handler)
        handler.close()


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
    handler = BatchedLinesHandler(stream, interval=3600, batched=[logger.name])
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        logger.warning("lost")
        logger.warning("kept")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "no space left on device" in capsys.readouterr().err
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["kept"]


class Picky(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.msg == "unformattable":
            raise ValueError("cannot format this one")
        return super().format(record)


def test_a_line_that_cannot_be_formatted_is_reported_and_the_others_are_written(
    logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = io.StringIO()
    handler = BatchedLinesHandler(stream, interval=3600, batched=[logger.name])
    handler.setFormatter(Picky())
    logger.addHandler(handler)
    try:
        logger.info("before")
        logger.info("unformattable")
        logger.info("after")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "cannot format this one" in capsys.readouterr().err
    lines = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert lines == ["before", "after"]
