"""What machine a benchmark ran on, in one line for its report."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def describe() -> str:
    """Date, CPU, cores, memory, OS, and the versions that set the numbers."""
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {_cpu_model()}, {os.cpu_count()} cores, "
        f"{_memory_gib():.0f} GiB; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, grpcio {metadata.version('grpcio')}, "
        f"asyncpg {metadata.version('asyncpg')}"
    )
