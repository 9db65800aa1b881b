"""The event loop the service's processes run on (uvloop where it is installed: it is a
dependency on every platform it supports, asyncio's own loop otherwise), and how its
background tasks are stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


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
