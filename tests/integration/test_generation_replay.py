"""CreateGeneration replays are judged on their request_id before the catalogue: a replay returns
the original generation even after its model left the catalogue, however many and however
concurrent; a new request for an unknown model is still refused for its model, and a request_id
reused with other parameters is still IDEMPOTENCY_KEY_REUSED. On the real server and database,
over both transports (test ids say which)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from credits.v1 import generation_pb2, generation_service_pb2_grpc
from server import app as application
from tests.fixtures.errors import Failure, failure
from tests.fixtures.server import TEST_MODELS, User
from tests.fixtures.workers import (
    CANCELLED,
    COST,
    MODEL,
    QUEUED,
    CreditStub,
    GenerationStub,
    balance,
    cancel_unfinished,
    create,
    funded,
    get,
    owner_connection,
    rows_of,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
REUSED = (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")

# Offered only by the service as it ran before its restart (see `before_the_restart`).
RETIRED_MODEL, RETIRED_COST = "test-image-retired", 7
RETIRED_ENTRY = f"""
[models.{RETIRED_MODEL}]
cost = {RETIRED_COST}
description = "a demo PNG no longer offered"
provider = "demo"
timeout_seconds = 5
max_attempts = 2
"""


async def fails(call: object) -> tuple[Failure, str]:
    """The contract's error details and the message of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return failure(raised.value), raised.value.details() or ""


async def model_active(database_url: str, model: str) -> bool | None:
    """Whether the database's catalogue offers `model` (None: it has no row for it)."""
    async with owner_connection(database_url) as conn:
        active: bool | None = await conn.fetchval(
            "select active from public.credit_models where model = $1", model
        )
        return active


@contextlib.asynccontextmanager
async def before_the_restart(
    server: application.Application, tmp_path: Path
) -> AsyncIterator[GenerationStub]:
    """The service as it ran before a restart: `server`'s settings (its transport, its database)
    with a catalogue that also offers RETIRED_MODEL. On leaving, it stops, and `server` writes
    its own catalogue as its start-up does, which deactivates RETIRED_MODEL: the restart with
    another CREDITS_MODELS, and the shared catalogue as every other test expects it."""
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(TEST_MODELS.read_text(encoding="utf-8") + RETIRED_ENTRY, encoding="utf-8")
    try:
        before = await application.start(
            dataclasses.replace(server.settings, models_path=catalogue)
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{before.port}") as channel:
                yield generation_service_pb2_grpc.GenerationServiceStub(channel)
        finally:
            await before.stop(grace=1)
    finally:
        await server.backend.generations.sync_models(list(server.backend.catalogue.values()))


@pytest.fixture
async def made(generations: GenerationStub) -> AsyncIterator[list[str]]:
    """Ids of generations a test made; those not final at its end are cancelled."""
    ids: list[str] = []
    yield ids
    await cancel_unfinished(generations, ids)


async def send(
    generations: GenerationStub,
    user: User,
    *,
    model: str = RETIRED_MODEL,
    prompt: str = "a fox",
    request_id: str = "replay-1",
) -> generation_pb2.Generation:
    """The request the replay test sends, with what a call changes of it."""
    return await create(
        generations,
        user,
        model=model,
        prompt=prompt,
        parameters={"size": "32"},
        request_id=request_id,
    )


async def test_a_replay_after_its_model_left_the_catalogue_returns_the_original(
    server: application.Application,
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
    tmp_path: Path,
    made: list[str],
) -> None:
    user = await funded(credits, 100)
    async with before_the_restart(server, tmp_path) as before:
        original = await send(before, user)
        made.append(original.generation_id)
        assert (original.model, original.cost, original.state) == (
            RETIRED_MODEL,
            RETIRED_COST,
            QUEUED,
        )
    assert await model_active(database_url, RETIRED_MODEL) is False
    assert RETIRED_MODEL not in server.backend.catalogue

    # However many, however concurrent: the original, and nothing more reserved.
    replays = await asyncio.gather(*(send(generations, user) for _ in range(10)))
    assert {r.generation_id for r in replays} == {original.generation_id}
    assert {(r.hold_id, r.model, r.cost, r.create_time.ToDatetime()) for r in replays} == {
        (original.hold_id, RETIRED_MODEL, RETIRED_COST, original.create_time.ToDatetime())
    }
    assert await rows_of(database_url, user) == (1, 1)
    assert await balance(credits, user) == (100, RETIRED_COST)

    # A new request for the model is refused for its model, naming what is offered.
    new, message = await fails(send(generations, user, request_id="replay-2"))
    assert (new.code, new.reason, new.field_violations) == (INVALID, "INVALID_ARGUMENT", ["model"])
    assert MODEL in message
    # The key with other parameters is still reused, with the retired model or a known one.
    other_prompt, _ = await fails(send(generations, user, prompt="a dog"))
    other_model, _ = await fails(send(generations, user, model=MODEL))
    assert (other_prompt.code, other_prompt.reason) == REUSED
    assert (other_model.code, other_model.reason) == REUSED
    assert await rows_of(database_url, user) == (1, 1)
    assert await balance(credits, user) == (100, RETIRED_COST)

    # It is still an ordinary generation: cancelling it releases its reservation.
    await cancel_unfinished(generations, [original.generation_id])
    assert (await get(generations, user, original.generation_id)).state == CANCELLED
    assert await balance(credits, user) == (100, 0)


async def test_a_reused_request_id_naming_an_unknown_model_is_key_reused(
    credits: CreditStub, generations: GenerationStub, database_url: str, made: list[str]
) -> None:
    # The key exists with other parameters: whatever model this request names, it cannot
    # succeed under that key, so the answer is the key's, not the catalogue's.
    user = await funded(credits, 100)
    original = await create(generations, user, request_id="r1")
    made.append(original.generation_id)
    reused, _ = await fails(create(generations, user, model="no-such-model", request_id="r1"))
    assert (reused.code, reused.reason) == REUSED
    # A new request_id with that model is the model's error, and creates nothing.
    unknown, message = await fails(create(generations, user, model="no-such-model"))
    assert (unknown.code, unknown.reason, unknown.field_violations) == (
        INVALID,
        "INVALID_ARGUMENT",
        ["model"],
    )
    assert MODEL in message
    assert await rows_of(database_url, user) == (1, 1)
    assert await balance(credits, user) == (100, COST)


@pytest.mark.parametrize(
    "model", ["", "m" * 101, "test-image\x00"], ids=["empty", "101-characters", "nul"]
)
async def test_a_model_no_catalogue_can_hold_is_malformed_even_for_a_used_request_id(
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
    made: list[str],
    model: str,
) -> None:
    # Malformed, like an empty request_id: refused before any key is looked up.
    user = await funded(credits, 100)
    original = await create(generations, user, request_id="r1")
    made.append(original.generation_id)
    for request_id in ("r1", uuid.uuid4().hex):
        refused, _ = await fails(create(generations, user, model=model, request_id=request_id))
        assert (refused.code, refused.reason, refused.field_violations) == (
            INVALID,
            "INVALID_ARGUMENT",
            ["model"],
        )
    assert await rows_of(database_url, user) == (1, 1)
