"""A closed-loop HTTP load generator for the Connect edge, in the style of bench/loadgen.py.

Each process runs `concurrency / processes` callers on aiohttp, every caller on a keep-alive
connection of its own (so the load reaches every server process behind a SO_REUSEPORT port).
Each caller POSTs the scenario's next request as Connect JSON (`application/json`, the
service's own JSON mapping) with its user's token, waits for the answer, and sends the next; a
call is an error unless it answers HTTP 200. The warm-up is left out of what is counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time

import aiohttp
from google.protobuf import json_format

from bench import loadgen
from bench.cpu import Watch
from bench.loadgen import Load, Result


def run(load: Load, watch: Watch | None = None) -> Result:
    """Drive `load` (its target a `host:port` Connect edge) from its processes at once (and
    measure what `watch`'s processes spend meanwhile)."""
    return loadgen.run(load, _drive, watch)


def _body(request: object) -> bytes:
    as_dict = json_format.MessageToDict(request)  # type: ignore[arg-type]
    return json.dumps(as_dict, separators=(",", ":")).encode()


async def _drive(
    load: Load, callers: int, index: int, start_at: float
) -> tuple[int, int, list[float]]:
    url = f"http://{load.target}{load.scenario.method}"
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(callers)
    ]
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        begin = time.perf_counter()
        measure_from = begin + load.warmup
        stop_at = measure_from + load.seconds
        sequence = itertools.count()
        latencies: list[float] = []
        errors = 0

        async def caller(session: aiohttp.ClientSession, number: int) -> None:
            nonlocal errors
            tag = f"{os.getpid()}-{index}-{number}"
            while True:
                request, metadata = load.scenario.request(tag, next(sequence))
                headers = {**dict(metadata), "content-type": "application/json"}
                body = _body(request)
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                if not ok:
                    errors += sent >= measure_from
                    continue
                done = time.perf_counter()
                if sent >= measure_from and done <= stop_at:
                    latencies.append((done - sent) * 1000)

        await asyncio.gather(*(caller(session, n) for n, session in enumerate(sessions)))
        return len(latencies), errors, latencies
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
