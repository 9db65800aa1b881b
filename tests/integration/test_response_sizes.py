"""What a caller can make the service store and send back is bounded: prompts and parameters by
configurable byte limits, listings by pages that always fit the send limit, and a response that
does not fit is logged with the status the caller got (RESOURCE_EXHAUSTED), not OK.

Each test runs its own server (both transports) with a small CREDITS_MAX_SEND_MESSAGE_BYTES or
small request limits, over the session's database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, generation_service_pb2_grpc
from credits.v1 import generation_service_pb2 as gpb
from server import app as application
from server.config import Settings
from server.observability.logs import JsonFormatter
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.errors import failure
from tests.fixtures.server import SERVICE, TRANSPORTS, User, new_user, settings_for

pytestmark = pytest.mark.timeout(90)

KIB = 1024
# 50 metadata entries of a 64-character key and a 500-character value: ~28 KB a transaction.
BIG_METADATA = {f"{i:02d}" + "k" * 62: "v" * 500 for i in range(50)}
# 4000 characters of 4 bytes each: the longest prompt, 16000 bytes.
BIG_PROMPT = "\N{GRINNING FACE}" * 4000


@dataclasses.dataclass
class Served:
    app: application.Application
    credits: credit_service_pb2_grpc.CreditServiceStub
    generations: generation_service_pb2_grpc.GenerationServiceStub


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Served]:
    app = await application.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield Served(
                app,
                credit_service_pb2_grpc.CreditServiceStub(channel),
                generation_service_pb2_grpc.GenerationServiceStub(channel),
            )
    finally:
        await app.stop(grace=1)


@pytest.fixture(params=TRANSPORTS)
def base_settings(
    request: pytest.FixtureRequest, database_url: str, supabase: FakeSupabase
) -> Settings:
    return settings_for(request.param, database_url, supabase)


async def funded(served: Served, amount: int) -> User:
    user = new_user()
    await served.credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    await served.credits.GrantCredits(
        pb.GrantCreditsRequest(user_id=user.user_id, amount=amount, idempotency_key="seed"),
        metadata=SERVICE,
    )
    return user


async def test_a_listing_of_large_transactions_comes_in_pages_that_fit(
    base_settings: Settings,
) -> None:
    limit = 64 * KIB
    async with serving(dataclasses.replace(base_settings, max_send_message_bytes=limit)) as s:
        user = await funded(s, 100)
        for i in range(8):
            await s.credits.DebitCredits(
                pb.DebitCreditsRequest(amount=1, idempotency_key=f"d{i}", metadata=BIG_METADATA),
                metadata=user.metadata,
            )
        keys: list[str] = []
        pages = 0
        token = ""
        while True:
            page = await s.credits.ListTransactions(
                pb.ListTransactionsRequest(page_size=20, page_token=token), metadata=user.metadata
            )
            assert page.ByteSize() <= limit
            pages += 1
            keys += [t.idempotency_key for t in page.transactions]
            token = page.next_page_token
            if not token:
                break
    assert keys == [f"d{i}" for i in reversed(range(8))] + ["seed"]
    assert pages >= 4  # two of these transactions at most fit in 64 KiB


async def test_a_listing_of_large_generations_comes_in_pages_that_fit(
    base_settings: Settings,
) -> None:
    limit = 64 * KIB
    async with serving(dataclasses.replace(base_settings, max_send_message_bytes=limit)) as s:
        user = await funded(s, 100)
        made = []
        for i in range(8):
            reply = await s.generations.CreateGeneration(
                gpb.CreateGenerationRequest(
                    model="test-image", prompt=BIG_PROMPT, request_id=f"g{i}"
                ),
                metadata=user.metadata,
            )
            made.append(reply.generation.generation_id)
        listed: list[str] = []
        token = ""
        while True:
            page = await s.generations.ListGenerations(
                gpb.ListGenerationsRequest(page_size=50, page_token=token), metadata=user.metadata
            )
            assert page.ByteSize() <= limit
            assert 0 < len(page.generations) < 8
            listed += [g.generation_id for g in page.generations]
            token = page.next_page_token
            if not token:
                break
        for generation_id in made:
            await s.generations.CancelGeneration(
                gpb.CancelGenerationRequest(generation_id=generation_id), metadata=user.metadata
            )
    assert listed == list(reversed(made))


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    return [
        json.loads(formatter.format(record))
        for record in caplog.records
        if record.name == "credits.access"
    ]


async def test_a_response_too_large_to_send_is_logged_as_the_caller_saw_it(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="credits.access")
    limit = 8 * KIB
    async with serving(dataclasses.replace(base_settings, max_send_message_bytes=limit)) as s:
        user = await funded(s, 100)
        request_id = f"too-large-{uuid.uuid4().hex}"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await s.credits.DebitCredits(
                pb.DebitCreditsRequest(amount=1, idempotency_key="big", metadata=BIG_METADATA),
                metadata=(*user.metadata, ("x-request-id", request_id)),
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The request id still comes back, and the server keeps serving.
        assert dict(caught.value.trailing_metadata() or ())["x-request-id"] == request_id
        small = await s.credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
        assert small.balance == 99  # the debit happened; only its answer could not be sent
    [line] = [entry for entry in access_lines(caplog) if entry["request_id"] == request_id]
    assert line["code"] == "RESOURCE_EXHAUSTED"


async def test_prompt_and_parameters_are_bounded_in_bytes(base_settings: Settings) -> None:
    # test-image declares delay_ms (a whole number): {"delay_ms": "0"} is 9 bytes.
    settings = dataclasses.replace(base_settings, max_prompt_bytes=100, max_parameters_bytes=9)
    async with serving(settings) as s:
        user = await funded(s, 100)

        async def refused(prompt: str, parameters: dict[str, str]) -> list[str]:
            """The fields CreateGeneration refuses (none when it queues the generation)."""
            try:
                reply = await s.generations.CreateGeneration(
                    gpb.CreateGenerationRequest(
                        model="test-image",
                        prompt=prompt,
                        parameters=parameters,
                        request_id=uuid.uuid4().hex,
                    ),
                    metadata=user.metadata,
                )
            except grpc.aio.AioRpcError as error:
                found = failure(error)
                assert (found.code, found.reason) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "INVALID_ARGUMENT",
                )
                return found.field_violations
            await s.generations.CancelGeneration(
                gpb.CancelGenerationRequest(generation_id=reply.generation.generation_id),
                metadata=user.metadata,
            )
            return []

        assert await refused("x" * 100, {}) == []
        assert await refused("x" * 101, {}) == ["prompt"]
        assert await refused("\N{LATIN SMALL LETTER E WITH ACUTE}" * 51, {}) == ["prompt"]
        assert await refused("a cat", {"delay_ms": "0"}) == []
        assert await refused("a cat", {"delay_ms": "10"}) == ["parameters"]


async def test_the_default_limits_take_the_longest_prompt(base_settings: Settings) -> None:
    async with serving(base_settings) as s:
        user = await funded(s, 100)
        reply = await s.generations.CreateGeneration(
            gpb.CreateGenerationRequest(model="test-image", prompt=BIG_PROMPT, request_id="long"),
            metadata=user.metadata,
        )
        assert reply.generation.prompt == BIG_PROMPT
        await s.generations.CancelGeneration(
            gpb.CancelGenerationRequest(generation_id=reply.generation.generation_id),
            metadata=user.metadata,
        )
