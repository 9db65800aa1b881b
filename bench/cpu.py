"""CPU seconds spent by process trees, read from /proc: what a bench row cost the server under
test and the PostgreSQL cluster behind it, whatever the machine's other tenants were doing.

A tree's seconds are each live process's own user and system time plus what its exited and
reaped children spent (cutime, cstime), over the root and all its live descendants, so a
backend or worker that exits between two readings is still counted (in its parent's cutime).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU seconds of the server processes and of the database's, at one moment or between two."""

    server: float
    database: float

    def __sub__(self, earlier: Usage) -> Usage:
        return Usage(self.server - earlier.server, self.database - earlier.database)

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.server + other.server, self.database + other.database)

    def __truediv__(self, count: float) -> Usage:
        return Usage(self.server / count, self.database / count)

    @property
    def total(self) -> float:
        return self.server + self.database


def _processes() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, its own and its reaped children's CPU in ticks)."""
    found: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        # "pid (name) state ppid ...": the name may hold spaces or parentheses.
        fields = text.rsplit(")", 1)[1].split()
        # Fields 4 and 14 to 17 of proc(5), counted here from the state (field 3) as 0.
        ppid, utime, stime, cutime, cstime = int(fields[1]), *map(int, fields[11:15])
        found[int(entry.name)] = (ppid, utime + stime + cutime + cstime)
    return found


def _tree_seconds(processes: dict[int, tuple[int, int]], roots: Iterable[int]) -> float:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    ticks, stack = 0, [pid for pid in roots if pid in processes]
    while stack:
        pid = stack.pop()
        ticks += processes[pid][1]
        stack.extend(children.get(pid, ()))
    return ticks / _TICKS


@dataclass(frozen=True, slots=True)
class Watch:
    """The process trees a row is charged for: the server's roots and the database's
    (the embedded cluster's postmaster, whose children are its backends)."""

    server: tuple[int, ...]
    database: tuple[int, ...]

    def read(self) -> Usage:
        processes = _processes()
        return Usage(_tree_seconds(processes, self.server), _tree_seconds(processes, self.database))
