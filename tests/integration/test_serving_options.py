"""Serving options on the real server: the receive limit refuses a large request and keeps
serving, and gzip compression shrinks what crosses the wire (counted by a TCP relay)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from server import app as application
from server.config import Settings
from tests.fixtures.server import SERVICE, TEST_JWT_SECRET, TEST_MODELS, new_user

pytestmark = pytest.mark.timeout(60)

RPC_TIMEOUT = 10.0


def _settings(database_url: str, **options: object) -> Settings:
    base = Settings(
        listen="127.0.0.1:0",
        jwt_secret=TEST_JWT_SECRET,
        models_path=TEST_MODELS,
        workers=0,
        database_url=database_url,
    )
    return dataclasses.replace(base, **options)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _serving(settings: Settings) -> AsyncIterator[application.Application]:
    app = await application.start(settings)
    try:
        yield app
    finally:
        await app.stop(grace=1)


async def test_a_request_above_the_receive_limit_is_refused_and_the_server_keeps_serving(
    database_url: str,
) -> None:
    user = new_user()
    async with (
        _serving(_settings(database_url, max_receive_message_bytes=512)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        small = await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
        assert small.balance == 0
        large = pb.DebitCreditsRequest(amount=1, idempotency_key="big", description="x" * 1000)
        assert large.ByteSize() > 512
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.DebitCredits(large, metadata=user.metadata, timeout=RPC_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The same connection and a new one are both still served.
        again = await stub.GetBalance(
            pb.GetBalanceRequest(), metadata=user.metadata, timeout=RPC_TIMEOUT
        )
        assert again.user_id == user.user_id
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as fresh:
            other = credit_service_pb2_grpc.CreditServiceStub(fresh)
            answer = await other.GetBalance(
                pb.GetBalanceRequest(), metadata=user.metadata, timeout=RPC_TIMEOUT
            )
            assert answer.user_id == user.user_id


class Relay:
    """A TCP relay to a server that counts the bytes the server sends back."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self.downstream = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer, count=False)),
            asyncio.create_task(self._pipe(up_reader, writer, count=True)),
        ):
            self._tasks.add(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if count:
                    self.downstream += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def _bytes_for_ledger_page(
    app: application.Application, user_metadata: object
) -> tuple[int, int]:
    """(bytes the server sent, size of the message) for one ListTransactions on a fresh
    connection through the relay."""
    relay = Relay(app.port)
    port = await relay.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = credit_service_pb2_grpc.CreditServiceStub(channel)
            page = await stub.ListTransactions(
                pb.ListTransactionsRequest(page_size=50),
                metadata=user_metadata,  # type: ignore[arg-type]
                timeout=RPC_TIMEOUT,
            )
        assert len(page.transactions) == 20
        assert all(t.description == "y" * 1000 for t in page.transactions)
        return relay.downstream, page.ByteSize()
    finally:
        await relay.stop()


async def test_gzip_compression_shrinks_responses_on_the_wire(database_url: str) -> None:
    user = new_user()
    async with (
        _serving(_settings(database_url)) as plain,
        _serving(_settings(database_url, compression="gzip")) as gzip,
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plain.port}") as channel:
            stub = credit_service_pb2_grpc.CreditServiceStub(channel)
            await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
            for i in range(20):
                await stub.GrantCredits(
                    pb.GrantCreditsRequest(
                        user_id=user.user_id,
                        amount=1,
                        idempotency_key=f"grant-{i}",
                        description="y" * 1000,
                    ),
                    metadata=SERVICE,
                    timeout=RPC_TIMEOUT,
                )
        plain_bytes, size = await _bytes_for_ledger_page(plain, user.metadata)
        gzip_bytes, gzip_size = await _bytes_for_ledger_page(gzip, user.metadata)
    assert size == gzip_size > 20_000
    # Uncompressed, the whole message crosses the wire; gzip sends a small fraction of it.
    assert plain_bytes >= size, (plain_bytes, size)
    assert gzip_bytes < size / 4, (gzip_bytes, size)


async def test_calls_above_the_stream_limit_wait_for_a_stream_instead_of_failing(
    database_url: str,
) -> None:
    user = new_user()
    async with (
        _serving(_settings(database_url, max_concurrent_streams=4)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = credit_service_pb2_grpc.CreditServiceStub(channel)
        answers = await asyncio.gather(
            *(
                stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata, timeout=30)
                for _ in range(200)
            ),
            return_exceptions=True,
        )
    failures = [answer for answer in answers if isinstance(answer, BaseException)]
    assert failures == []
