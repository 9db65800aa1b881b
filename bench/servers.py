"""Servers under test as real processes: `credits serve` and the echo servers (gRPC and HTTP),
each on a port of its own, waited for through gRPC health (or /healthz, or a connection) and
stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from server.db import embedded, migrate

CREDITS = Path(sys.executable).parent / "credits"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_RECONNECT_AT_ONCE = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 10),
]


def wait_serving(target: str, timeout: float = 60.0, service: str = "") -> None:
    """Block until `target`'s health says SERVING (polling every 10 ms)."""
    deadline = time.monotonic() + timeout
    # Retry the connection every 10 ms: by default a channel refused once (the server not yet
    # listening) waits a second before trying again, which the cold start would count.
    with grpc.insecure_channel(target, options=_RECONNECT_AT_ONCE) as channel:
        # By method name: the health stubs' type hints lack HealthStub's methods.
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        while time.monotonic() < deadline:
            try:
                reply = check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.01)
    raise TimeoutError(f"{target} did not become SERVING in {timeout} s")


def wait_ready(target: str, timeout: float = 30.0) -> None:
    """Block until `target` accepts a connection (for the echo server, which has no health)."""
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)


def wait_http(address: str, path: str = "/healthz", timeout: float = 30.0) -> None:
    """Block until `http://address` answers `path` with 200 (the echo answers any path)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:  # refused, or an HTTP error status (urllib.error.HTTPError)
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{address} did not answer {path} in {timeout} s")


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CREDITS_")}
    for key in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_JWT_SECRET"):
        env.pop(key, None)
    return {**env, **extra}


@contextlib.contextmanager
def running(
    command: list[str], env: Mapping[str, str], log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` running (in `cwd`) with its output in `log`; SIGTERM (then SIGKILL) when
    done."""
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out, cwd=cwd)  # noqa: S603
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def credits_serve(
    settings: Mapping[str, str], log: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """`credits serve` with exactly these CREDITS_*/database variables (and no Connect edge
    unless they name CREDITS_HTTP_LISTEN)."""
    env = clean_env({"CREDITS_HTTP_LISTEN": "", **settings})
    return running([str(CREDITS), "serve"], env, log)


def echo_serve(
    port: int, processes: int, log: Path, mode: str = "echo", database_url: str = ""
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """bench/echo.py: bare, or with one database call per RPC (mode select1 or debit)."""
    command = [sys.executable, "-m", "bench.echo", str(port), str(processes), mode, database_url]
    return running(command, clean_env({}), log)


def http_echo_serve(
    port: int, processes: int, log: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """bench/http_echo.py: a bare ASGI application under the Connect edge's uvicorn."""
    command = [sys.executable, "-m", "bench.http_echo", str(port), str(processes)]
    return running(command, clean_env({}), log)


def cold_start(data_dir: Path, log: Path, extra: Mapping[str, str]) -> float:
    """Seconds from launching `credits serve` on an empty data dir to health SERVING."""
    port = free_port()
    settings = {**extra, "CREDITS_DATA_DIR": str(data_dir), "CREDITS_LISTEN": f"127.0.0.1:{port}"}
    started = time.perf_counter()
    with credits_serve(settings, log):
        wait_serving(f"127.0.0.1:{port}")
        return time.perf_counter() - started


@contextlib.contextmanager
def migrated_database() -> Iterator[str]:
    """A fresh embedded PostgreSQL in a scratch directory, migrated: its URL; stopped after."""
    with tempfile.TemporaryDirectory(prefix="credits-bench-db-") as scratch:
        database = embedded.EmbeddedPostgres.start_blocking(Path(scratch) / "db")
        try:
            asyncio.run(migrate.migrate(database.uri))
            yield database.uri
        finally:
            database.stop()
