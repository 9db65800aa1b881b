"""How long a database step may take: CREDITS_DB_TIMEOUT_SECONDS, cut shorter to fit within the
deadline of the call being served (runtime.step_timeout), which the edge sets per call."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from server import runtime
from server.config import Settings


def in_fresh_context(seconds_left: float | None, configured: float) -> float:
    def step() -> float:
        runtime.set_deadline(seconds_left)
        return runtime.step_timeout(configured)

    return contextvars.copy_context().run(step)


def test_the_configured_timeout_when_the_call_has_no_deadline() -> None:
    assert in_fresh_context(None, 3.0) == 3.0


def test_a_far_deadline_leaves_the_configured_timeout() -> None:
    assert in_fresh_context(10.0, 3.0) == 3.0


def test_a_near_deadline_cuts_the_timeout_to_what_is_left_less_a_margin() -> None:
    timeout = in_fresh_context(1.0, 3.0)
    assert 1.0 - runtime.DEADLINE_MARGIN - 0.05 < timeout <= 1.0 - runtime.DEADLINE_MARGIN


def test_a_passed_deadline_still_gives_a_step_a_moment() -> None:
    assert in_fresh_context(0.0, 3.0) == runtime.MIN_STEP_SECONDS


async def test_each_call_task_has_its_own_deadline() -> None:
    async def call(seconds_left: float | None) -> float:
        runtime.set_deadline(seconds_left)
        await asyncio.sleep(0)
        return runtime.step_timeout(3.0)

    near, none = await asyncio.gather(call(1.0), call(None))
    assert near < 1.0
    assert none == 3.0


def test_the_database_timeout_is_read_from_the_environment() -> None:
    assert Settings.from_env({}).db_timeout_seconds == 3.0
    assert Settings.from_env({"CREDITS_DB_TIMEOUT_SECONDS": "1.5"}).db_timeout_seconds == 1.5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_database_timeout_that_is_not_a_positive_number_names_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match="CREDITS_DB_TIMEOUT_SECONDS"):
        Settings.from_env({"CREDITS_DB_TIMEOUT_SECONDS": value})
