"""GenerationService end to end on the real server: the catalogue, a paid generation from queue
to capture (watched as it happens), idempotent creation, the money checks, validation, who may
see what, and paging. Runs over both transports (test ids say which)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from credits.v1 import generation_pb2, generation_service_pb2_grpc
from credits.v1 import generation_service_pb2 as gpb
from server import app as application
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.errors import Failure, failure
from tests.fixtures.server import SERVICE, TEST_MODELS, User, new_user, settings_for
from tests.fixtures.workers import (
    CANCELLED,
    COST,
    MODEL,
    PRICEY_COST,
    PRICEY_MODEL,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    CreditStub,
    GenerationStub,
    balance,
    cancel_unfinished,
    captures,
    create,
    funded,
    get,
    owner_connection,
    rows_of,
    running_workers,
)

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
PNG = b"\x89PNG"


async def fails(call: object) -> Failure:
    """The contract's error details of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return failure(raised.value)


async def fails_with_message(call: object) -> tuple[Failure, str]:
    """Like `fails`, with the status message too (to compare two answers exactly)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return failure(raised.value), raised.value.details() or ""


async def watch_all(generations: GenerationStub, user: User, generation_id: str) -> list[int]:
    """Every state WatchGeneration sends until it ends (bounded)."""
    call = generations.WatchGeneration(
        gpb.WatchGenerationRequest(generation_id=generation_id), metadata=user.metadata, timeout=10
    )
    return [message.generation.state async for message in call]


@pytest.fixture
async def made(generations: GenerationStub) -> AsyncIterator[list[str]]:
    """Ids of generations a test made; those not final at its end are cancelled."""
    ids: list[str] = []
    yield ids
    await cancel_unfinished(generations, ids)


# Catalogue


async def test_list_models_is_the_catalogue_by_cost(generations: GenerationStub) -> None:
    reply = await generations.ListModels(gpb.ListModelsRequest(), metadata=new_user().metadata)
    assert [(m.model, m.cost) for m in reply.models] == [
        (MODEL, COST),
        (PRICEY_MODEL, PRICEY_COST),
    ]
    assert all(m.description for m in reply.models)
    # The demo provider declares its parameters; delay_ms is bounded, so no one job holds a
    # worker for long.
    for model in reply.models:
        assert not model.accepts_any_parameters
        assert [
            (p.name, generation_pb2.ParameterType.Name(p.type), p.required)
            for p in model.parameters
        ] == [
            ("delay_ms", "PARAMETER_TYPE_INTEGER", False),
            ("fail", "PARAMETER_TYPE_STRING", False),
            ("size", "PARAMETER_TYPE_INTEGER", False),
        ]
        delay, fail, size = model.parameters
        assert (delay.minimum, delay.maximum) == (0, 60000)
        assert (size.minimum, size.maximum) == (16, 256)
        assert fail.pattern
        assert not fail.HasField("minimum")
        assert all(p.description for p in model.parameters)


# A generation from queue to charge


async def test_a_successful_generation_is_watched_and_charged_once(
    server: application.Application, credits: CreditStub, generations: GenerationStub
) -> None:
    user = await funded(credits, 100)
    created = await create(generations, user, parameters={"delay_ms": "1500"})
    assert (created.state, created.cost, created.attempts, created.transaction_id) == (
        QUEUED,
        COST,
        0,
        "",
    )
    assert created.hold_id
    assert await balance(credits, user) == (100, COST)

    # Subscribed before any worker runs: the first message is the queued generation.
    call = generations.WatchGeneration(
        gpb.WatchGenerationRequest(generation_id=created.generation_id),
        metadata=user.metadata,
        timeout=15,
    )
    first = await call.read()
    assert first != grpc.aio.EOF
    assert first.generation.state == QUEUED
    messages = [first.generation]
    async with running_workers(server):
        while (message := await call.read()) != grpc.aio.EOF:
            messages.append(message.generation)
    assert [m.state for m in messages] == [QUEUED, RUNNING, SUCCEEDED]

    final = messages[-1]
    assert final.output.startswith(PNG)
    assert (final.output_mime_type, final.attempts, final.error_message) == ("image/png", 1, "")
    assert final.transaction_id

    charged = await captures(credits, user)
    assert [(t.amount, t.transaction_id, t.hold_id) for t in charged] == [
        (COST, final.transaction_id, created.hold_id)
    ]
    assert await balance(credits, user) == (100 - COST, 0)

    fetched = await get(generations, user, created.generation_id)
    assert (fetched.state, fetched.output) == (SUCCEEDED, final.output)

    older = await create(generations, user, parameters={"fail": "always"})
    listed = await generations.ListGenerations(gpb.ListGenerationsRequest(), metadata=user.metadata)
    assert [g.generation_id for g in listed.generations] == [
        older.generation_id,
        created.generation_id,
    ], "newest first"
    succeeded = listed.generations[1]
    assert (succeeded.state, succeeded.transaction_id, succeeded.output) == (
        SUCCEEDED,
        final.transaction_id,
        b"",
    ), "ListGenerations leaves outputs out"
    await cancel_unfinished(generations, [older.generation_id])


@pytest.mark.parametrize("server", ["postgres"], indirect=True)
async def test_a_watch_sends_every_transition_of_a_retried_generation(
    server: application.Application, credits: CreditStub, generations: GenerationStub
) -> None:
    """One message per state change, in order, also the retry's way back to QUEUED (the
    postgres transport's NOTIFY carries each change; without it a watcher re-reads)."""
    user = await funded(credits, 100)
    created = await create(generations, user, parameters={"fail": "first:1", "delay_ms": "300"})
    call = generations.WatchGeneration(
        gpb.WatchGenerationRequest(generation_id=created.generation_id),
        metadata=user.metadata,
        timeout=15,
    )
    first = await call.read()
    assert first != grpc.aio.EOF
    messages = [first.generation]
    async with running_workers(server):
        while (message := await call.read()) != grpc.aio.EOF:
            messages.append(message.generation)
    assert [(m.state, m.attempts) for m in messages] == [
        (QUEUED, 0),
        (RUNNING, 1),
        (QUEUED, 1),
        (RUNNING, 2),
        (SUCCEEDED, 2),
    ]
    assert "scripted transient failure" in messages[2].error_message
    assert messages[-1].output.startswith(PNG)


async def test_a_final_generation_cannot_be_cancelled(
    credits: CreditStub, generations: GenerationStub
) -> None:
    user = await funded(credits, 10)
    created = await create(generations, user)
    cancelled = await generations.CancelGeneration(
        gpb.CancelGenerationRequest(generation_id=created.generation_id), metadata=user.metadata
    )
    assert cancelled.generation.state == CANCELLED
    again = await fails(
        generations.CancelGeneration(
            gpb.CancelGenerationRequest(generation_id=created.generation_id),
            metadata=user.metadata,
        )
    )
    assert (again.code, again.reason, again.domain) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "GENERATION_NOT_CANCELLABLE",
        "credits.v1",
    )
    assert await balance(credits, user) == (10, 0)
    # A watcher of a final generation gets it once, and the stream ends.
    assert await watch_all(generations, user, created.generation_id) == [CANCELLED]


# Idempotency and money


async def test_one_request_id_creates_one_generation_however_concurrent(
    credits: CreditStub, generations: GenerationStub, database_url: str, made: list[str]
) -> None:
    user = await funded(credits, 100)
    results = await asyncio.gather(
        *(
            create(generations, user, prompt="a cat", parameters={"size": "32"}, request_id="r1")
            for _ in range(20)
        )
    )
    made.append(results[0].generation_id)
    assert {g.generation_id for g in results} == {results[0].generation_id}
    assert {g.hold_id for g in results} == {results[0].hold_id}
    assert await rows_of(database_url, user) == (1, 1)
    assert await balance(credits, user) == (100, COST)

    reused = await fails(create(generations, user, prompt="a dog", request_id="r1"))
    assert (reused.code, reused.reason) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert await rows_of(database_url, user) == (1, 1)


async def test_not_enough_credits_creates_nothing(
    credits: CreditStub, generations: GenerationStub, database_url: str
) -> None:
    user = await funded(credits, 3)
    short = await fails(create(generations, user))
    assert (short.code, short.reason, short.metadata) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
        {"required": str(COST), "available": "3", "scope": MODEL},
    )
    assert short.precondition_subjects, "a PreconditionFailure detail"
    assert await rows_of(database_url, user) == (0, 0)
    assert await balance(credits, user) == (3, 0)


# Validation


def _request(**overrides: object) -> gpb.CreateGenerationRequest:
    fields: dict[str, object] = {
        "model": MODEL,
        "prompt": "a red square",
        "parameters": {},
        "request_id": uuid.uuid4().hex,
    }
    fields.update(overrides)
    return gpb.CreateGenerationRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_request(model="no-such-model"), "model"),
        # The model's provider declares its parameters: a bad or unknown one is named.
        (_request(parameters={"delay_ms": "abc"}), "parameters.delay_ms"),
        (_request(parameters={"delay_ms": "600000"}), "parameters.delay_ms"),
        (_request(parameters={"delay_ms": "-1"}), "parameters.delay_ms"),
        (_request(parameters={"size": "huge"}), "parameters.size"),
        (_request(parameters={"size": "1024"}), "parameters.size"),
        (_request(parameters={"fail": "sometimes"}), "parameters.fail"),
        (_request(parameters={"colour": "red"}), "parameters.colour"),
        (_request(prompt=""), "prompt"),
        (_request(prompt="   "), "prompt"),
        (_request(prompt="x" * 4001), "prompt"),
        (_request(parameters={f"k{i}": "v" for i in range(17)}), "parameters"),
        (_request(request_id=""), "request_id"),
        # PostgreSQL text and jsonb cannot hold NUL: refused as the field's error, not a failure.
        (_request(prompt="a red\x00square"), "prompt"),
        (_request(parameters={"size\x00": "1024"}), "parameters"),
        (_request(parameters={"size": "10\x0024"}), "parameters"),
    ],
    ids=[
        "unknown-model",
        "delay-not-a-number",
        "delay-above-its-maximum",
        "delay-negative",
        "size-not-a-number",
        "size-too-large",
        "fail-unknown-kind",
        "unknown-parameter",
        "empty-prompt",
        "blank-prompt",
        "long-prompt",
        "17-parameters",
        "no-id",
        "nul-in-prompt",
        "nul-in-parameter-key",
        "nul-in-parameter-value",
    ],
)
async def test_a_bad_create_names_its_field(
    credits: CreditStub,
    generations: GenerationStub,
    database_url: str,
    request_: gpb.CreateGenerationRequest,
    field: str,
) -> None:
    user = await funded(credits, 100)
    found = await fails(generations.CreateGeneration(request_, metadata=user.metadata))
    assert (found.code, found.reason, found.field_violations) == (
        INVALID,
        "INVALID_ARGUMENT",
        [field],
    )
    assert await rows_of(database_url, user) == (0, 0)


async def test_the_limits_themselves_are_accepted(
    credits: CreditStub, generations: GenerationStub, made: list[str]
) -> None:
    user = await funded(credits, 100)
    longest = await create(generations, user, prompt="x" * 4000)
    bounds = await create(
        generations, user, parameters={"delay_ms": "60000", "size": "256", "fail": "first:999999"}
    )
    made.extend([longest.generation_id, bounds.generation_id])
    assert (longest.state, bounds.state) == (QUEUED, QUEUED)


# A catalogue of an operator's own: the http provider's parameters declared in TOML, and a model
# whose provider declares none (any parameters, within the general limits).

OWN_MODELS = """
[models.test-http-declared]
cost = 3
description = "an HTTP model whose catalogue entry declares its parameters"
provider = "http"
timeout_seconds = 5
max_attempts = 1

[models.test-http-declared.settings]
url = "http://127.0.0.1:9/never-called"

[models.test-http-declared.settings.parameters.steps]
type = "integer"
minimum = 1
maximum = 50
required = true
description = "denoising steps"

[models.test-http-declared.settings.parameters.style]
type = "enum"
allowed_values = ["photo", "anime"]

[models.test-http-open]
cost = 2
description = "an HTTP model that declares no parameters"
provider = "http"
timeout_seconds = 5
max_attempts = 1

[models.test-http-open.settings]
url = "http://127.0.0.1:9/never-called"
"""


@dataclasses.dataclass
class OwnCatalogue:
    credits: CreditStub
    generations: GenerationStub


@pytest.fixture
async def own_catalogue(
    database_url: str, supabase: FakeSupabase, tmp_path: Path
) -> AsyncIterator[OwnCatalogue]:
    """A server of its own (PostgreSQL, no workers) offering the test catalogue and OWN_MODELS.
    Started for each test: a server makes the database offer only its own catalogue's models,
    so another server starting meanwhile would withdraw these."""
    path = tmp_path / "models.toml"
    path.write_text(TEST_MODELS.read_text() + OWN_MODELS)
    settings = settings_for("postgres", database_url, supabase)
    app = await application.start(dataclasses.replace(settings, models_path=path))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            own = OwnCatalogue(
                CreditStub(channel), generation_service_pb2_grpc.GenerationServiceStub(channel)
            )
            yield own
    finally:
        await app.stop(grace=1)


async def test_list_models_shows_the_parameters_a_catalogue_declares(
    own_catalogue: OwnCatalogue,
) -> None:
    reply = await own_catalogue.generations.ListModels(
        gpb.ListModelsRequest(), metadata=new_user().metadata
    )
    models = {m.model: m for m in reply.models}
    declared, open_ = models["test-http-declared"], models["test-http-open"]
    steps, style = declared.parameters
    assert (steps.name, steps.type, steps.required, steps.minimum, steps.maximum) == (
        "steps",
        generation_pb2.PARAMETER_TYPE_INTEGER,
        True,
        1,
        50,
    )
    assert steps.description == "denoising steps"
    assert (style.name, style.type, list(style.allowed_values), style.required) == (
        "style",
        generation_pb2.PARAMETER_TYPE_ENUM,
        ["photo", "anime"],
        False,
    )
    assert not style.HasField("minimum")
    assert not style.HasField("maximum")
    assert not declared.accepts_any_parameters
    assert open_.accepts_any_parameters
    assert not open_.parameters


async def test_declared_parameters_are_checked_and_undeclared_ones_pass(
    own_catalogue: OwnCatalogue, database_url: str
) -> None:
    credits, generations = own_catalogue.credits, own_catalogue.generations
    user = await funded(credits, 100)
    made: list[str] = []
    try:
        for parameters, fields in [
            ({}, ["parameters.steps"]),
            ({"steps": "51"}, ["parameters.steps"]),
            ({"steps": "1.5", "style": "oil"}, ["parameters.steps", "parameters.style"]),
            ({"steps": "5", "seed": "7"}, ["parameters.seed"]),
        ]:
            refused = await fails(
                create(generations, user, model="test-http-declared", parameters=parameters)
            )
            assert (refused.code, refused.field_violations) == (INVALID, fields), parameters
        assert await rows_of(database_url, user) == (0, 0)

        accepted = await create(
            generations,
            user,
            model="test-http-declared",
            parameters={"steps": "50", "style": "anime"},
        )
        # No declaration: anything within the general limits (16 entries, keys of 64
        # characters, values of 1000) is passed on.
        anything = {f"{i:02d}" + "k" * 62: "v" * 1000 for i in range(16)}
        most = await create(generations, user, model="test-http-open", parameters=anything)
        made.extend([accepted.generation_id, most.generation_id])
        assert (accepted.state, most.state) == (QUEUED, QUEUED)
        assert dict(most.parameters) == anything
    finally:
        await cancel_unfinished(generations, made)


@pytest.mark.parametrize("generation_id", ["not-a-uuid", ""])
async def test_a_bad_generation_id_is_invalid_everywhere(
    generations: GenerationStub, generation_id: str
) -> None:
    user = new_user()
    for call in (
        generations.GetGeneration(
            gpb.GetGenerationRequest(generation_id=generation_id), metadata=user.metadata
        ),
        generations.CancelGeneration(
            gpb.CancelGenerationRequest(generation_id=generation_id), metadata=user.metadata
        ),
        watch_all(generations, user, generation_id),
    ):
        found = await fails(call)
        assert (found.code, found.field_violations) == (INVALID, ["generation_id"])


# Who may see what


async def test_another_users_generation_is_not_found_like_an_unknown_one(
    credits: CreditStub, generations: GenerationStub, made: list[str]
) -> None:
    owner, other = await funded(credits, 10), await funded(credits, 10)
    theirs = await create(generations, owner)
    made.append(theirs.generation_id)

    async def answers(generation_id: str) -> list[tuple[grpc.StatusCode, str, str]]:
        results = []
        for call in (
            generations.GetGeneration(
                gpb.GetGenerationRequest(generation_id=generation_id), metadata=other.metadata
            ),
            generations.CancelGeneration(
                gpb.CancelGenerationRequest(generation_id=generation_id), metadata=other.metadata
            ),
            watch_all(generations, other, generation_id),
        ):
            found, message = await fails_with_message(call)
            results.append((found.code, found.reason, message))
        return results

    someone_elses = await answers(theirs.generation_id)
    unknown = await answers(str(uuid.uuid4()))
    assert someone_elses == unknown
    assert {(code, reason) for code, reason, _ in unknown} == {(NOT_FOUND, "GENERATION_NOT_FOUND")}
    # Nothing happened to it, and its owner still pays nothing more.
    assert (await get(generations, owner, theirs.generation_id)).state == QUEUED
    assert await balance(credits, owner) == (10, COST)

    as_service = await generations.GetGeneration(
        gpb.GetGenerationRequest(generation_id=theirs.generation_id), metadata=SERVICE
    )
    assert as_service.generation.user_id == owner.user_id


async def test_a_user_may_not_name_another_user(
    credits: CreditStub, generations: GenerationStub, database_url: str
) -> None:
    owner, other = await funded(credits, 10), await funded(credits, 10)
    create_for = await fails(
        generations.CreateGeneration(_request(user_id=owner.user_id), metadata=other.metadata)
    )
    list_for = await fails(
        generations.ListGenerations(
            gpb.ListGenerationsRequest(user_id=owner.user_id), metadata=other.metadata
        )
    )
    for found in (create_for, list_for):
        assert (found.code, found.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
    assert await rows_of(database_url, owner) == (0, 0)


# Paging


async def test_list_generations_pages_newest_first(
    credits: CreditStub, generations: GenerationStub, made: list[str]
) -> None:
    user, other = await funded(credits, 100), await funded(credits, 0)
    for i in range(5):
        made.append((await create(generations, user, prompt=f"picture {i}")).generation_id)

    pages: list[list[str]] = []
    token = ""
    first_token = ""
    while True:
        reply = await generations.ListGenerations(
            gpb.ListGenerationsRequest(page_size=2, page_token=token), metadata=user.metadata
        )
        pages.append([g.generation_id for g in reply.generations])
        token = reply.next_page_token
        first_token = first_token or token
        if not token:
            break
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [g for page in pages for g in page] == made[::-1]

    stolen = await fails(
        generations.ListGenerations(
            gpb.ListGenerationsRequest(page_size=2, page_token=first_token),
            metadata=other.metadata,
        )
    )
    assert (stolen.code, stolen.field_violations) == (INVALID, ["page_token"])
    # The service may list the user's, and a user's token stays bound to that user.
    as_service = await generations.ListGenerations(
        gpb.ListGenerationsRequest(user_id=user.user_id, page_size=10), metadata=SERVICE
    )
    assert [g.generation_id for g in as_service.generations] == made[::-1]
    for generation in as_service.generations:
        assert generation.state == generation_pb2.GENERATION_STATE_QUEUED


# A server that stops


@pytest.mark.parametrize("transport", ["postgres", "supabase"])
async def test_stopping_the_server_ends_an_open_watch_at_once(
    database_url: str, supabase: FakeSupabase, transport: str
) -> None:
    """SIGTERM's path (Application.stop) with a 30 s grace: an open watch of a generation that
    would take a minute ends at once with UNAVAILABLE / SERVER_STOPPING and a RetryInfo, so it
    neither holds the server for its grace period nor ends with gRPC's "Cancelling all calls"."""
    app = await application.start(settings_for(transport, database_url, supabase))
    grace = 30.0
    stopped = False
    created: generation_pb2.Generation | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            user = await funded(CreditStub(channel), 100)
            created = await create(stub, user, parameters={"delay_ms": "60000"})
            call = stub.WatchGeneration(
                gpb.WatchGenerationRequest(generation_id=created.generation_id),
                metadata=user.metadata,
            )
            first = await call.read()
            assert first != grpc.aio.EOF
            assert first.generation.state == QUEUED

            started = time.monotonic()
            await app.stop(grace=grace)
            stopped, took = True, time.monotonic() - started
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
        assert took < 3, f"stop took {took:.1f} s with a watch open"
        found = failure(ended.value)
        assert (found.code, found.reason, found.domain) == (
            grpc.StatusCode.UNAVAILABLE,
            "SERVER_STOPPING",
            "credits.v1",
        )
        assert found.retry_delay_seconds == 1.0
        assert "stopping" in (ended.value.details() or "")
    finally:
        if not stopped:
            await app.stop(grace=1)
        if created is not None:
            async with owner_connection(database_url) as owner:
                await owner.execute(
                    "select public.credit_cancel_generation($1, null)",
                    uuid.UUID(created.generation_id),
                )
