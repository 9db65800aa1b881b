"""The event loop the service's processes run on: uvloop where it is installed (it is a
dependency on every platform it supports), asyncio's own loop otherwise."""

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
