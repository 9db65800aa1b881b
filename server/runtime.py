"""The event loop the service's processes run on (uvloop where it is installed: it is a
dependency on every platform it supports, asyncio's own loop otherwise), how its background
tasks are stopped, and the deadline of the call being served (set by the edge, read by the
storage adapters, so neither the domain nor a transport knows gRPC)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# What a storage step leaves of the call's remaining time for the answer to travel back (the
# server sees the deadline a little later than the caller set it, and the error still has to
# be sent).
DEADLINE_MARGIN = 0.25
# The least time a storage step is given, however near the deadline: a healthy database
# answers within it, and a caller out of time gets UNAVAILABLE rather than a step never tried.
MIN_STEP_SECONDS = 0.05

# When the call being served must be answered by (time.monotonic()), or None: no deadline.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "credits_deadline", default=None
)


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the fastest loop available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover (a platform without uvloop wheels)
        return asyncio.run(main)
    return uvloop.run(main)


async def stop(*tasks: asyncio.Task[Any]) -> None:
    """Cancel `tasks` and wait until each has ended; an error one ended with is raised.

    Waiting never mistakes a task's CancelledError for the caller's: a caller that took one for
    its own and carried on (a worker stopping its lease keeper) lost its own cancellation, so it
    kept claiming jobs and its pool's stop waited forever. A cancellation of the caller while it
    waits still reaches it.
    """
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


def set_deadline(seconds_left: float | None) -> None:
    """The call being served (this task's context) must be answered within `seconds_left`
    seconds (None: the caller set no deadline)."""
    _deadline.set(None if seconds_left is None else time.monotonic() + seconds_left)


def step_timeout(configured: float) -> float:
    """How long a storage step of the current call may take: `configured`, or less when the
    call's deadline is nearer, so that the caller hears UNAVAILABLE before its deadline."""
    deadline = _deadline.get()
    if deadline is None:
        return configured
    left = deadline - DEADLINE_MARGIN - time.monotonic()
    return max(min(configured, left), MIN_STEP_SECONDS)
