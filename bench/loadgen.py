"""A closed-loop gRPC load generator spread over several processes.

Each process runs `concurrency / processes` callers on grpc.aio, every caller on its own
connection (a local subchannel pool), so the load reaches every server process behind a
SO_REUSEPORT port and no one HTTP/2 connection serialises the callers. Each caller sends one
request, waits for its answer, and sends the next: the latency of every call is kept, and the
warm-up is left out of what is counted.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from bench.cpu import Usage, Watch
from bench.scenarios import Scenario


@dataclass(frozen=True, slots=True)
class Load:
    """How hard and how long to drive one scenario."""

    target: str
    scenario: Scenario
    concurrency: int
    processes: int
    seconds: float = 5.0
    warmup: float = 1.0


@dataclass(frozen=True, slots=True)
class Result:
    """What a run measured: calls per second and latency percentiles in milliseconds."""

    calls: int
    errors: int
    seconds: float
    latencies_ms: Sequence[float]
    # CPU the watched processes spent over the measured seconds (None: nothing watched).
    cpu: Usage | None = None

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    def cpu_per_call(self) -> Usage | None:
        """CPU seconds per call, of the server and of the database."""
        if self.cpu is None or not self.calls:
            return None
        return self.cpu / self.calls

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def mean(self) -> float:
        """The mean latency in milliseconds."""
        return statistics.fmean(self.latencies_ms) if self.latencies_ms else float("nan")


# One load process's part: (calls, errors, latencies in ms) of `callers` callers.
Part = tuple[int, int, list[float]]
# What a load process runs: drive(load, callers, process index, start time) -> its part.
Drive = Callable[[Load, int, int, float], Awaitable[Part]]


def run(load: Load, drive: Drive | None = None, watch: Watch | None = None) -> Result:
    """Drive `load` from its processes at once and merge what each measured; `drive` is the
    protocol's caller loop (a module-level function, to reach the spawned processes): gRPC's
    by default. With `watch`, the CPU its processes spent over the measured seconds too."""
    processes = max(1, min(load.processes, load.concurrency))
    shares = [
        load.concurrency // processes + (i < load.concurrency % processes) for i in range(processes)
    ]
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 1.5  # every process starts its clock together, after spawning
    chosen = drive or _drive
    with context.Pool(processes) as pool:
        pending = pool.starmap_async(
            _process,
            [(chosen, load, share, index, start_at) for index, share in enumerate(shares)],
        )
        cpu = None if watch is None else _measure(watch, start_at + load.warmup, load.seconds)
        parts = pending.get()
    latencies = [value for part in parts for value in part[2]]
    return Result(
        calls=sum(part[0] for part in parts),
        errors=sum(part[1] for part in parts),
        seconds=load.seconds,
        latencies_ms=latencies,
        cpu=cpu,
    )


def _measure(watch: Watch, start: float, seconds: float) -> Usage:
    """What `watch`'s processes spend from `start` (time.time()) for `seconds`: the window in
    which the callers count their calls."""
    time.sleep(max(0.0, start - time.time()))
    before = watch.read()
    time.sleep(max(0.0, start + seconds - time.time()))
    return watch.read() - before


def _process(drive: Drive, load: Load, callers: int, index: int, start_at: float) -> Part:
    try:
        import uvloop

        runner: Callable[..., object] = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(drive(load, callers, index, start_at))  # type: ignore[return-value]


async def _drive(
    load: Load, callers: int, index: int, start_at: float
) -> tuple[int, int, list[float]]:
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(load.target, options=options) for _ in range(callers)]
    try:
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        begin = time.perf_counter()
        measure_from = begin + load.warmup
        stop_at = measure_from + load.seconds
        sequence = itertools.count()
        latencies: list[float] = []
        errors = 0

        async def caller(channel: grpc.aio.Channel, number: int) -> None:
            nonlocal errors
            call = load.scenario.bind(channel)
            tag = f"{os.getpid()}-{index}-{number}"
            while True:
                request, metadata = load.scenario.request(tag, next(sequence))
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                try:
                    await call(request, metadata=metadata)
                except grpc.aio.AioRpcError:
                    errors += sent >= measure_from
                    continue
                done = time.perf_counter()
                if sent >= measure_from and done <= stop_at:
                    latencies.append((done - sent) * 1000)

        await asyncio.gather(*(caller(channel, n) for n, channel in enumerate(channels)))
        return len(latencies), errors, latencies
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
