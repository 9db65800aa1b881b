"""Generations and workers over the in-memory FakeGenerationStore and a ChangeFeed.

No database and no gRPC: the rules of server/generation/lifecycle.py (who may call, what is
valid, watching) and worker.py (claim, lease, provider call, the recorded outcome), with the
queue's documented behaviour kept by the fake (tests/fakes/stores.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any

import pytest

from server.auth.principal import ServicePrincipal, UserPrincipal
from server.errors import (
    GenerationNotCancellable,
    GenerationNotFound,
    IdempotencyKeyReused,
    InvalidArgument,
)
from server.generation import lifecycle
from server.generation.feed import ChangeFeed, StateChange
from server.generation.lifecycle import Generations
from server.generation.models import ClaimedJob, Generation, GenerationState, ModelSpec
from server.generation.providers.base import Job, Output, Provider, ProviderError
from server.generation.worker import Worker, WorkerPool, WorkerSettings
from tests.fakes.stores import FakeGenerationStore, RecordedFailure

IMAGE = ModelSpec("image", cost=5, description="", provider="fake", max_attempts=3)
TEXT = ModelSpec("text", cost=1, description="", provider="fake", max_attempts=3)
CATALOGUE = {spec.model: spec for spec in (IMAGE, TEXT)}
SERVICE = ServicePrincipal()
Q, R, S = GenerationState.QUEUED, GenerationState.RUNNING, GenerationState.SUCCEEDED


def a_user() -> UserPrincipal:
    return UserPrincipal(uuid.uuid4(), "u@example.com", token="jwt", claims={})


@pytest.fixture
def feed() -> ChangeFeed:
    return ChangeFeed()


@pytest.fixture
def store(feed: ChangeFeed) -> FakeGenerationStore:
    return FakeGenerationStore(CATALOGUE, feed=feed)


@pytest.fixture
def generations(store: FakeGenerationStore, feed: ChangeFeed) -> Generations:
    return Generations(store, CATALOGUE, feed)


@pytest.fixture
def alice() -> UserPrincipal:
    return a_user()


async def create(
    generations: Generations,
    principal: UserPrincipal,
    *,
    model: str = "image",
    prompt: str = "a red fox",
    parameters: Mapping[str, str] | None = None,
    request_id: str = "r1",
) -> Generation:
    return await generations.create(
        principal,
        "",
        model=model,
        prompt=prompt,
        parameters=parameters or {},
        request_id=request_id,
    )


async def next_of(stream: AsyncIterator[Generation], within: float = 2.0) -> Generation:
    async with asyncio.timeout(within):
        return await anext(stream)


async def ended(stream: AsyncIterator[Generation]) -> bool:
    try:
        await next_of(stream)
    except StopAsyncIteration:
        return True
    return False


# Create


async def test_create_queues_the_generation_and_wakes_the_workers(alice: UserPrincipal) -> None:
    feed = ChangeFeed()
    silent = FakeGenerationStore(CATALOGUE)  # no notification arrives (as on Supabase)
    assert not feed.queued.is_set()
    made = await create(Generations(silent, CATALOGUE, feed), alice, parameters={"size": "512"})
    assert (made.state, made.cost, made.user_id) == (Q, IMAGE.cost, alice.user_id)
    assert dict(made.parameters) == {"size": "512"}
    assert feed.queued.is_set()


async def test_a_request_id_replays_its_generation_and_refuses_other_parameters(
    generations: Generations, alice: UserPrincipal
) -> None:
    first = await create(generations, alice)
    again = await create(generations, alice)
    assert again.generation_id == first.generation_id
    with pytest.raises(IdempotencyKeyReused):
        await create(generations, alice, prompt="a blue fox")


LONG_PROMPT = "p" * (lifecycle.MAX_PROMPT_LENGTH + 1)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": LONG_PROMPT}, "prompt"),
        ({"prompt": "a\x00b"}, "prompt"),
        ({"parameters": {f"k{i}": "v" for i in range(17)}}, "parameters"),
        ({"parameters": {"": "v"}}, "parameters"),
        ({"parameters": {"k": "v" * 1001}}, "parameters"),
        ({"parameters": {"k": "\x00"}}, "parameters"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": "r" * 256}, "request_id"),
        ({"model": ""}, "model"),
        ({"model": "m" * 101}, "model"),
        ({"model": "m\x00"}, "model"),
    ],
)
async def test_a_create_argument_error_names_its_field(
    generations: Generations,
    store: FakeGenerationStore,
    feed: ChangeFeed,
    alice: UserPrincipal,
    fields: dict[str, Any],
    field: str,
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await create(generations, alice, **fields)
    assert [v.field for v in refused.value.violations] == [field]
    assert store.calls == []
    assert not feed.queued.is_set()


async def test_an_unknown_model_is_refused_naming_the_catalogue(
    generations: Generations, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await create(generations, alice, model="nope")
    assert [v.field for v in refused.value.violations] == ["model"]
    assert "(image, text)" in refused.value.violations[0].description
    assert not feed.queued.is_set()


async def test_a_replay_is_answered_after_its_model_left_the_catalogue(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    first = await create(Generations(store, CATALOGUE, feed), alice)
    del store.models["image"]
    later = Generations(store, {"text": TEXT}, feed)
    assert (await create(later, alice)).generation_id == first.generation_id
    with pytest.raises(InvalidArgument):  # a new request for it is refused
        await create(later, alice, request_id="r2")


# Get, cancel, list: the owner rule


async def test_get_follows_the_owner_rule(generations: Generations, alice: UserPrincipal) -> None:
    made = await create(generations, alice)
    generation_id = str(made.generation_id)
    assert (await generations.get(alice, generation_id)).generation_id == made.generation_id
    assert (await generations.get(SERVICE, generation_id)).generation_id == made.generation_id
    with pytest.raises(GenerationNotFound):  # another user's is like an unknown one
        await generations.get(a_user(), generation_id)
    with pytest.raises(InvalidArgument) as refused:
        await generations.get(alice, "nope")
    assert [v.field for v in refused.value.violations] == ["generation_id"]


async def test_cancel_follows_the_owner_rule_and_refuses_a_final_generation(
    generations: Generations, alice: UserPrincipal
) -> None:
    made = await create(generations, alice)
    generation_id = str(made.generation_id)
    with pytest.raises(GenerationNotFound):
        await generations.cancel(a_user(), generation_id)
    assert (await generations.get(alice, generation_id)).state == Q
    cancelled = await generations.cancel(alice, generation_id)
    assert cancelled.state == GenerationState.CANCELLED
    with pytest.raises(GenerationNotCancellable):
        await generations.cancel(alice, generation_id)


async def test_a_service_may_cancel_anyones(generations: Generations, alice: UserPrincipal) -> None:
    made = await create(generations, alice)
    cancelled = await generations.cancel(SERVICE, str(made.generation_id))
    assert cancelled.state == GenerationState.CANCELLED


async def test_list_pages_a_users_own_generations_newest_first(
    generations: Generations, alice: UserPrincipal
) -> None:
    made = [await create(generations, alice, request_id=f"r{n}") for n in range(5)]
    other = a_user()
    await create(generations, other)
    listed: list[uuid.UUID] = []
    token, pages = "", 0
    while True:
        page = await generations.list(alice, "", 2, token)
        listed.extend(g.generation_id for g in page.generations)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert listed == [g.generation_id for g in reversed(made)]
    first = await generations.list(alice, "", 2, "")
    with pytest.raises(InvalidArgument) as refused:
        await generations.list(other, "", 2, first.next_page_token)
    assert [v.field for v in refused.value.violations] == ["page_token"]


# Watch


async def test_watch_yields_the_state_now_then_each_change_until_a_final_one(
    generations: Generations, store: FakeGenerationStore, alice: UserPrincipal
) -> None:
    made = await create(generations, alice)
    stream = generations.watch(alice, str(made.generation_id))
    assert (await next_of(stream)).state == Q
    job = await store.claim("w1", 30)
    assert job is not None
    running = await next_of(stream)
    assert (running.state, running.attempts) == (R, 1)
    await store.complete(job.generation_id, "w1", b"png bytes", "image/png")
    done = await next_of(stream)
    assert done.state == S
    assert (done.output, done.output_mime_type) == (b"png bytes", "image/png")  # re-read
    assert await ended(stream)


async def test_watch_sends_every_transition_of_a_retry_in_order(
    generations: Generations, store: FakeGenerationStore, alice: UserPrincipal
) -> None:
    made = await create(generations, alice)
    stream = generations.watch(alice, str(made.generation_id))
    states = [(await next_of(stream)).state]
    for retryable in (True, False):
        job = await store.claim("w1", 30)
        assert job is not None
        states.append((await next_of(stream)).state)
        await store.fail(
            job.generation_id, "w1", "busy", retryable=retryable, retry_delay_seconds=0
        )
        states.append((await next_of(stream)).state)
    assert states == [Q, R, Q, R, GenerationState.FAILED]
    assert await ended(stream)


async def test_watching_a_final_generation_yields_it_once(
    generations: Generations, alice: UserPrincipal
) -> None:
    made = await create(generations, alice)
    await generations.cancel(alice, str(made.generation_id))
    stream = generations.watch(alice, str(made.generation_id))
    assert (await next_of(stream)).state == GenerationState.CANCELLED
    assert await ended(stream)


async def test_watch_follows_the_owner_rule(generations: Generations, alice: UserPrincipal) -> None:
    made = await create(generations, alice)
    with pytest.raises(GenerationNotFound):
        await next_of(generations.watch(a_user(), str(made.generation_id)))


async def test_watch_skips_changes_it_has_already_sent(
    generations: Generations, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    made = await create(generations, alice)
    stream = generations.watch(alice, str(made.generation_id))
    current = await next_of(stream)
    for late in (timedelta(seconds=-1), timedelta(0)):  # older than what was sent, and as old
        feed.publish(
            StateChange(
                generation_id=made.generation_id,
                state=R,
                attempts=1,
                error_message="",
                transaction_id=None,
                output_mime_type="",
                update_time=current.update_time + late,
            )
        )
    await generations.cancel(alice, str(made.generation_id))
    assert (await next_of(stream)).state == GenerationState.CANCELLED  # no stale RUNNING
    assert await ended(stream)


@pytest.mark.parametrize("live", [True, False], ids=["live feed", "no publisher"])
async def test_watch_rereads_when_no_change_arrives(
    monkeypatch: pytest.MonkeyPatch, alice: UserPrincipal, live: bool
) -> None:
    # The interval of the other kind of feed is too long to be reached within the test.
    monkeypatch.setattr(lifecycle, "WATCH_RECHECK_SECONDS", 0.01 if live else 60.0)
    monkeypatch.setattr(lifecycle, "POLL_SECONDS", 60.0 if live else 0.01)
    feed = ChangeFeed()
    feed.live = live
    silent = FakeGenerationStore(CATALOGUE)  # publishes nothing: every notification is lost
    generations = Generations(silent, CATALOGUE, feed)
    made = await create(generations, alice)
    stream = generations.watch(alice, str(made.generation_id))
    assert (await next_of(stream)).state == Q
    job = await silent.claim("w1", 30)
    assert job is not None
    assert (await next_of(stream, within=1.0)).state == R
    await silent.complete(job.generation_id, "w1", b"out", "text/plain")
    assert (await next_of(stream, within=1.0)).state == S
    assert await ended(stream)


# Workers


OUTPUT = Output(b"out", "image/png")


class FakeProvider:
    """A fake provider: answers `output`, or raises `error`, after `delay` seconds (or once
    `release` is set); records the jobs it was given."""

    def __init__(
        self,
        output: Output = OUTPUT,
        *,
        error: BaseException | None = None,
        delay: float = 0.0,
    ) -> None:
        self.output = output
        self.error = error
        self.delay = delay
        self.jobs: list[Job] = []
        self.called = asyncio.Event()

    async def generate(self, job: Job) -> Output:
        self.jobs.append(job)
        self.called.set()
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.output


class ClosableProvider(FakeProvider):
    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    async def aclose(self) -> None:
        self.closed += 1


SETTINGS = WorkerSettings(retry_base_seconds=2, retry_max_seconds=5, idle_seconds=0.05)


def a_worker(
    store: FakeGenerationStore,
    feed: ChangeFeed,
    provider: Provider,
    *,
    catalogue: Mapping[str, ModelSpec] = CATALOGUE,
    settings: WorkerSettings = SETTINGS,
) -> Worker:
    providers = dict.fromkeys(catalogue, provider)
    return Worker(store, catalogue, providers, feed, settings, name="w1")


async def claimed(store: FakeGenerationStore, user: UserPrincipal) -> ClaimedJob:
    await store.create(
        SERVICE, user.user_id, model="image", prompt="a fox", parameters={"k": "v"}, request_id="r"
    )
    job = await store.claim("w1", 30)
    assert job is not None
    return job


async def state_of(store: FakeGenerationStore, job: ClaimedJob) -> Generation:
    return await store.get(SERVICE, job.generation_id, None)


async def test_a_worker_completes_a_job_its_provider_answers(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    provider = FakeProvider(Output(b"image", "image/png"))
    job = await claimed(store, alice)
    await a_worker(store, feed, provider).process(job)
    done = await state_of(store, job)
    assert (done.state, done.output, done.output_mime_type) == (S, b"image", "image/png")
    assert done.transaction_id is not None  # charged
    assert provider.jobs == [Job(str(job.generation_id), "image", "a fox", {"k": "v"}, 1)]
    assert store.failures == []


async def test_a_retryable_provider_error_is_recorded_for_a_retry(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    provider = FakeProvider(error=ProviderError("busy", retryable=True))
    job = await claimed(store, alice)
    await a_worker(store, feed, provider).process(job)
    assert store.failures == [RecordedFailure(job.generation_id, "w1", "busy", True, 2)]
    assert (await state_of(store, job)).state == Q


@pytest.mark.parametrize(("attempt", "delay"), [(1, 2), (2, 4), (3, 5), (7, 5)])
async def test_the_retry_delay_doubles_per_attempt_up_to_its_cap(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal, attempt: int, delay: int
) -> None:
    provider = FakeProvider(error=ProviderError("busy", retryable=True))
    job = dataclasses.replace(await claimed(store, alice), attempt=attempt)
    await a_worker(store, feed, provider).process(job)
    assert [f.retry_delay_seconds for f in store.failures] == [delay]


async def test_a_non_retryable_provider_error_fails_the_generation(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    provider = FakeProvider(error=ProviderError("prompt refused", retryable=False))
    job = await claimed(store, alice)
    await a_worker(store, feed, provider).process(job)
    assert [(f.error, f.retryable) for f in store.failures] == [("prompt refused", False)]
    failed = await state_of(store, job)
    assert (failed.state, failed.error_message) == (GenerationState.FAILED, "prompt refused")


@pytest.mark.parametrize("gone", ["catalogue", "provider"])
async def test_a_model_no_longer_offered_fails_without_a_retry(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal, gone: str
) -> None:
    provider = FakeProvider()
    worker = (
        a_worker(store, feed, provider, catalogue={"text": TEXT})
        if gone == "catalogue"
        else Worker(store, CATALOGUE, {"text": provider}, feed, SETTINGS, name="w1")
    )
    job = await claimed(store, alice)
    await worker.process(job)
    assert provider.jobs == []
    [failure] = store.failures
    assert not failure.retryable
    assert "'image'" in failure.error
    assert (await state_of(store, job)).state == GenerationState.FAILED


async def test_a_provider_timeout_is_a_retryable_failure(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    slow = FakeProvider(delay=60)
    due_at_once = {"image": dataclasses.replace(IMAGE, timeout_seconds=0)}
    job = await claimed(store, alice)
    await a_worker(store, feed, slow, catalogue=due_at_once).process(job)
    [failure] = store.failures
    assert failure.retryable
    assert "timed out" in failure.error
    assert (await state_of(store, job)).state == Q


async def test_an_unexpected_provider_exception_is_a_retryable_failure(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    job = await claimed(store, alice)
    await a_worker(store, feed, FakeProvider(error=RuntimeError("bug"))).process(job)
    assert [(f.error, f.retryable) for f in store.failures] == [
        ("the provider failed unexpectedly", True)
    ]


async def test_an_output_over_the_limit_fails_without_a_retry(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    settings = dataclasses.replace(SETTINGS, max_output_bytes=3)
    job = await claimed(store, alice)
    await a_worker(store, feed, FakeProvider(Output(b"1234", "x")), settings=settings).process(job)
    [failure] = store.failures
    assert not failure.retryable
    assert (await state_of(store, job)).state == GenerationState.FAILED


async def test_the_lease_is_renewed_while_the_provider_works(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    settings = dataclasses.replace(SETTINGS, lease_seconds=1)  # renewed every 1/3 s
    job = await claimed(store, alice)
    await a_worker(store, feed, FakeProvider(delay=0.45), settings=settings).process(job)
    assert "renew_lease" in store.calls
    assert (await state_of(store, job)).state == S


async def test_a_job_that_stops_being_the_workers_is_stopped_and_discarded(
    store: FakeGenerationStore, feed: ChangeFeed, alice: UserPrincipal
) -> None:
    settings = dataclasses.replace(SETTINGS, lease_seconds=1)
    job = await claimed(store, alice)
    await store.cancel(SERVICE, job.generation_id, None)  # the next renewal finds it gone
    slow = FakeProvider(delay=60)
    async with asyncio.timeout(2):
        await a_worker(store, feed, slow, settings=settings).process(job)
    assert "complete" not in store.calls
    assert store.failures == []
    assert (await state_of(store, job)).state == GenerationState.CANCELLED


async def test_a_pool_runs_queued_generations_and_closes_closable_providers_once(
    store: FakeGenerationStore, feed: ChangeFeed, generations: Generations, alice: UserPrincipal
) -> None:
    closable, plain = ClosableProvider(), FakeProvider()
    worker = Worker(store, CATALOGUE, {"image": closable, "text": plain}, feed, SETTINGS)
    pool = WorkerPool([worker], providers=[closable, plain])
    pool.start()
    try:
        made = await create(generations, alice)
        stream = generations.watch(alice, str(made.generation_id))
        states = [(await next_of(stream)).state]
        while not states[-1].final:
            states.append((await next_of(stream)).state)
        assert states[-1] == S
    finally:
        await pool.stop()
    assert closable.closed == 1
    await pool.stop()
    assert closable.closed == 1


async def test_stopping_a_pool_lets_the_job_in_hand_finish_within_the_grace(
    store: FakeGenerationStore, feed: ChangeFeed, generations: Generations, alice: UserPrincipal
) -> None:
    provider = FakeProvider(delay=0.3)
    pool = WorkerPool([a_worker(store, feed, provider)])
    pool.start()
    made = await create(generations, alice)
    await asyncio.wait_for(provider.called.wait(), 2)
    await pool.stop(grace=5)
    finished = await store.get(SERVICE, made.generation_id, None)
    assert finished.state == S


async def test_stopping_a_pool_cancels_idle_workers_at_once_and_busy_ones_after_the_grace(
    store: FakeGenerationStore, feed: ChangeFeed, generations: Generations, alice: UserPrincipal
) -> None:
    idle = a_worker(store, feed, FakeProvider())
    pool = WorkerPool([idle])
    pool.start()
    started = asyncio.get_running_loop().time()
    await pool.stop(grace=5)
    assert asyncio.get_running_loop().time() - started < 1

    slow = FakeProvider(delay=30)
    pool = WorkerPool([a_worker(store, feed, slow)])
    pool.start()
    made = await create(generations, alice)
    await asyncio.wait_for(slow.called.wait(), 2)
    started = asyncio.get_running_loop().time()
    await pool.stop(grace=0.2)
    assert asyncio.get_running_loop().time() - started < 1
    # Cancelled with the job in hand: nothing recorded, the lease hands it on.
    assert (await store.get(SERVICE, made.generation_id, None)).state == R
