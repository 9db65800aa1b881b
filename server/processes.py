"""`credits serve` with CREDITS_PROCESSES > 1: a supervisor and N server processes on one port.

The parent never serves. It checks the port is free (a probe bound without SO_REUSEPORT: a port
another server or process group holds is refused, in one line), resolves the settings (the
embedded JWT secret included), reserves the port (a SO_REUSEPORT socket bound but not
listening, so port 0 becomes one port all children share and nobody else takes), starts the
embedded PostgreSQL and migrates it once when no database is configured, then starts each
child with the "spawn" method: a fresh interpreter,
never a fork of a process that imported grpc. A child gets the frozen Settings as its argument
through a pipe, so the secret is in no environment variable or command line.

Each child is `app.start` on that port: its own gRPC server (the kernel spreads connections
over the children) and Connect edge (CREDITS_HTTP_LISTEN, reserved and shared the same way),
health, metrics (CREDITS_METRICS_LISTEN port + i, or a port of its own for port 0),
CREDITS_WORKERS generation workers and a hold sweeper. Nothing runs twice: workers
claim jobs with `for update skip locked` under a lease, and the sweeper skips users another
transaction holds, so N processes share the work through the database.

SIGTERM or SIGINT to the parent is forwarded to every child (each turns health NOT_SERVING, lets
in-flight calls finish, exits 0); then the parent stops the embedded PostgreSQL and exits 0. A
child that dies otherwise is restarted; if children keep crashing (MAX_CRASHES within
CRASH_WINDOW seconds) the parent stops everything and exits 1. A child whose parent is gone
(SIGKILLed, say) stops by itself within a second or so. An embedded PostgreSQL whose postmaster
died is started again by the parent (each child's health follows the database meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from server import app as application
from server import runtime, serving
from server.config import Settings, host_port
from server.db import embedded
from server.db.watch import restart_blocking
from server.observability import logs

log = logging.getLogger(__name__)

GRACE = 10.0  # seconds a child lets in-flight calls finish (as the single-process server)
STOP_TIMEOUT = GRACE + 15.0  # then the parent SIGKILLs a child that is still running
START_TIMEOUT = 60.0  # for every child to be serving at start-up
MAX_CRASHES = 5
CRASH_WINDOW = 60.0
PARENT_POLL = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    """What a child reports once it serves."""

    index: int
    pid: int
    port: int
    metrics_port: int | None
    http_port: int | None = None


def reserve_port(host: str, port: int) -> socket.socket:
    """A SO_REUSEPORT socket bound to host:port (port 0: a free one), not listening: it holds
    the port for the children, which bind it too, and takes no connections itself."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        holder = socket.socket(family, kind, proto)
    except OSError as error:
        raise application.ConfigurationError(f"cannot listen on {host}:{port}: {error}") from None
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
    except OSError as error:
        holder.close()
        raise application.ConfigurationError(f"cannot listen on {host}:{port}: {error}") from None
    return holder


def _reserve(listen: str | None) -> tuple[socket.socket | None, str | None]:
    """The Connect edge's port reserved as the gRPC one is (port 0 made one port), and its
    address; (None, None) when the edge is off."""
    if not listen:
        return None, None
    host, port = host_port(listen)
    holder = reserve_port(host, port)
    port = holder.getsockname()[1]
    return holder, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def child_settings(settings: Settings, index: int) -> Settings:
    """Child `index`'s settings: metrics on port + index (port 0 stays 0: each picks one)."""
    metrics = settings.metrics_listen
    if not metrics:
        return settings
    host, port = host_port(metrics)
    return dataclasses.replace(settings, metrics_listen=f"{host}:{port + index if port else 0}")


def _child_main(settings: Settings, index: int, parent: int, ready: Connection) -> None:
    """A child's entry point (in a spawned interpreter)."""
    logs.configure()
    try:
        runtime.run(_serve_child(settings, index, parent, ready))
    finally:
        # A spawned child ends with os._exit, past the atexit hook that would flush the logs.
        logging.shutdown()


async def _serve_child(settings: Settings, index: int, parent: int, ready: Connection) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    app = await application.start(settings)
    try:
        metrics_port = app.metrics.server_port if app.metrics is not None else None
        ready.send(Ready(index, os.getpid(), app.port, metrics_port, app.http_port))
        ready.close()
        where = f", Connect on port {app.http_port}" if app.http_port is not None else ""
        where += f", metrics on port {metrics_port}" if metrics_port is not None else ""
        log.info("credits process %d serving on port %d%s", index, app.port, where)
        watcher = asyncio.create_task(_watch_parent(parent, stopping), name="parent-watch")
        await stopping.wait()
        watcher.cancel()
        log.info("shutting down")
    finally:
        await app.stop(GRACE)
    log.info("stopped")


async def _watch_parent(parent: int, stopping: asyncio.Event) -> None:
    """Set `stopping` when the supervisor is gone (this process was re-parented)."""
    while True:
        await asyncio.sleep(PARENT_POLL)
        if os.getppid() != parent:
            break
    log.warning("the supervisor (pid %d) is gone: stopping", parent)
    stopping.set()


@dataclasses.dataclass
class _Child:
    index: int
    process: BaseProcess
    ready: Connection | None  # until the child reports


class StopSignal:
    """SIGTERM and SIGINT, remembered, and a socket that becomes readable when one arrives (so a
    wait on the children wakes up)."""

    def __init__(self) -> None:
        self.requested = False
        self._read, self._write = socket.socketpair()
        for end in (self._read, self._write):
            end.setblocking(False)
        signal.set_wakeup_fd(self._write.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    @property
    def waitable(self) -> socket.socket:
        return self._read

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._read.recv(64):
                pass

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self._read.close()
        self._write.close()


class Supervisor:
    """Starts, watches, restarts and stops the children (run in the parent, no event loop)."""

    def __init__(
        self, settings: Settings, stop: StopSignal, database: embedded.EmbeddedPostgres | None
    ) -> None:
        self._settings = settings
        self._stop = stop
        self._database = database  # the embedded PostgreSQL, started again if it dies
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, _Child] = {}
        self._crashes: deque[float] = deque()

    def _spawn(self, index: int) -> None:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child_main,
            args=(child_settings(self._settings, index), index, os.getpid(), send),
            name=f"credits-{index}",
            daemon=True,
        )
        process.start()
        send.close()
        self._children[index] = _Child(index, process, receive)

    def start(self) -> bool:
        """Start every child and wait until each serves; False if one failed or a stop was
        asked for first."""
        for index in range(self._settings.processes):
            self._spawn(index)
        deadline = time.monotonic() + START_TIMEOUT
        while any(child.ready is not None for child in self._children.values()):
            if self._stop.requested:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("the server processes did not all start within %.0f s", START_TIMEOUT)
                return False
            for child in self._events(remaining):
                if child.ready is not None and not child.process.is_alive():
                    log.error(
                        "process %d (pid %s) exited with %s while starting",
                        child.index,
                        child.process.pid,
                        child.process.exitcode,
                    )
                    return False
        return True

    def _events(self, timeout: float) -> list[_Child]:
        """Wait up to `timeout` s for a child to report or exit, or a signal; the children with
        news (ready ones have reported: their `ready` is then None)."""
        sources: dict[Connection | int, _Child] = {}
        for child in self._children.values():
            sources[child.process.sentinel] = child
            if child.ready is not None:
                sources[child.ready] = child
        woken = wait([*sources, self._stop.waitable], timeout)
        news: list[_Child] = []
        for source in woken:
            if isinstance(source, socket.socket):
                self._stop.drain()
                continue
            child = sources[source]  # type: ignore[index]  # a Connection or a sentinel
            if source is child.ready:
                self._receive_ready(child)
            news.append(child)
        return news

    def _receive_ready(self, child: _Child) -> None:
        assert child.ready is not None
        try:
            report: Ready = child.ready.recv()
        except (EOFError, OSError):
            return  # the child died before reporting; its sentinel says so
        child.ready.close()
        child.ready = None
        log.info(
            "process %d ready (pid %d)",
            report.index,
            report.pid,
            extra={"fields": {"process": report.index, "child_pid": report.pid}},
        )

    def run(self) -> bool:
        """Watch the children until a stop is asked for (True) or they keep crashing (False)."""
        while not self._stop.requested:
            for child in self._events(PARENT_POLL):
                if child.process.is_alive() or self._stop.requested:
                    continue
                if not self._restart(child):
                    return False
            if self._database is not None and not self._database.alive():
                restart_blocking(self._database)
        return True

    def _restart(self, child: _Child) -> bool:
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - CRASH_WINDOW:
            self._crashes.popleft()
        fields = {"process": child.index, "child_pid": child.process.pid}
        if len(self._crashes) >= MAX_CRASHES:
            log.error(
                "process %d (pid %s) exited with %s: %d crashes within %.0f s, giving up",
                child.index,
                child.process.pid,
                child.process.exitcode,
                len(self._crashes),
                CRASH_WINDOW,
                extra={"fields": fields},
            )
            return False
        log.warning(
            "process %d (pid %s) exited with %s: restarting it",
            child.index,
            child.process.pid,
            child.process.exitcode,
            extra={"fields": fields},
        )
        if child.ready is not None:
            child.ready.close()
        child.process.close()
        self._spawn(child.index)
        return True

    def stop(self) -> bool:
        """SIGTERM every child and wait for them (SIGKILL after STOP_TIMEOUT); True if every
        child stopped by itself."""
        for child in self._children.values():
            if child.process.is_alive() and child.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        clean = True
        for child in self._children.values():
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error(
                    "process %d (pid %s) did not stop: killing it", child.index, child.process.pid
                )
                child.process.kill()
                child.process.join()
                clean = False
            elif child.process.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
                clean = False
            if child.ready is not None:
                child.ready.close()
        return clean


def supervise(settings: Settings) -> int:
    """Run `settings.processes` server processes until SIGTERM or SIGINT; the exit code."""
    # Only this group's processes may share the port: one held by anyone else is refused here,
    # before the SO_REUSEPORT socket below would join it.
    serving.ensure_free(settings.listen)
    if settings.http_listen:
        serving.ensure_free(settings.http_listen)
    for index in range(settings.processes):
        metrics_listen = child_settings(settings, index).metrics_listen
        if metrics_listen:
            serving.ensure_free(metrics_listen)
    settings = application.resolve(settings)
    host, port = host_port(settings.listen)
    holder = reserve_port(host, port)
    port = holder.getsockname()[1]
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    http_holder, http_listen = _reserve(settings.http_listen)
    stop = StopSignal()
    database: embedded.EmbeddedPostgres | None = None
    supervisor: Supervisor | None = None
    ok = True
    try:
        database, children = application.start_shared_database(
            dataclasses.replace(settings, listen=listen, http_listen=http_listen)
        )
        supervisor = Supervisor(children, stop, database)
        if not stop.requested and supervisor.start():
            log.info(
                "credits serving on %s (%s, %d processes%s)",
                listen,
                application.store_description(settings, database),
                settings.processes,
                f"; Connect on {http_listen}" if http_listen else "",
            )
            ok = supervisor.run()
        else:
            ok = stop.requested
        log.info("shutting down")
    finally:
        clean = supervisor.stop() if supervisor is not None else True
        if database is not None:
            database.stop()
        holder.close()
        if http_holder is not None:
            http_holder.close()
        stop.close()
    log.info("stopped" if clean else "stopped (some processes had to be killed)")
    return 0 if ok and clean else 1
