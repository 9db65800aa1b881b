"""ProfileKeeper: a user's first call creates their profile, whatever it asks, and only then."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from server.auth.principal import ServicePrincipal, UserPrincipal
from server.credit.profiles import ProfileKeeper
from server.errors import (
    AccessDeniedByPolicy,
    BackendUnavailable,
    CreditsError,
    InsufficientCredits,
    PermissionDenied,
    ProfileNotFound,
)

SERVICE = ServicePrincipal()


def a_user() -> UserPrincipal:
    return UserPrincipal(uuid.uuid4(), "u@example.com", token="jwt", claims={})


class RecordingProfileStore:
    """A fake ProfileStore: records whose profile it was asked to make; `provision` fails with
    `error`, and `provision_known` knows the users in `known` (auth.users) only."""

    def __init__(self) -> None:
        self.provisioned: list[uuid.UUID] = []
        self.provisioned_known: list[uuid.UUID] = []
        self.known: set[uuid.UUID] = set()
        self.error: CreditsError | None = None

    async def provision(self, principal: UserPrincipal) -> None:
        self.provisioned.append(principal.user_id)
        if self.error is not None:
            raise self.error

    async def provision_known(self, user_id: uuid.UUID) -> None:
        self.provisioned_known.append(user_id)
        if user_id not in self.known:
            raise ProfileNotFound()


class Call:
    """A call that raises or returns each of `outcomes` in turn, the last one from then on;
    counts its runs."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.runs = 0

    async def __call__(self) -> object:
        self.runs += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def store() -> RecordingProfileStore:
    return RecordingProfileStore()


@pytest.fixture
def keeper(store: RecordingProfileStore) -> ProfileKeeper:
    return ProfileKeeper(store)


async def test_a_users_first_call_provisions_once_and_later_calls_never(
    keeper: ProfileKeeper, store: RecordingProfileStore
) -> None:
    user = a_user()
    for _ in range(3):
        assert await keeper.run(user, Call("ok")) == "ok"
    assert store.provisioned == [user.user_id]


async def test_each_user_is_provisioned_on_their_own_first_call(
    keeper: ProfileKeeper, store: RecordingProfileStore
) -> None:
    first, second = a_user(), a_user()
    await keeper.run(first, Call("ok"))
    await keeper.run(second, Call("ok"))
    await keeper.run(first, Call("ok"))
    assert store.provisioned == [first.user_id, second.user_id]


async def test_profile_not_found_provisions_then_runs_the_call_once_more(
    keeper: ProfileKeeper, store: RecordingProfileStore
) -> None:
    user, call = a_user(), Call(ProfileNotFound(), "ok")
    assert await keeper.run(user, call) == "ok"
    assert call.runs == 2
    assert store.provisioned == [user.user_id]


async def test_the_call_is_retried_only_once(
    keeper: ProfileKeeper, store: RecordingProfileStore
) -> None:
    call = Call(ProfileNotFound())
    with pytest.raises(ProfileNotFound):
        await keeper.run(a_user(), call)
    assert call.runs == 2
    assert len(store.provisioned) == 1


@pytest.mark.parametrize(
    "error",
    [InsufficientCredits(required=5, available=0), PermissionDenied(), ValueError("bug")],
    ids=["business error", "permission denied", "unexpected error"],
)
async def test_a_failing_call_still_provisions_and_keeps_its_error(
    keeper: ProfileKeeper, store: RecordingProfileStore, error: Exception
) -> None:
    user = a_user()
    with pytest.raises(type(error)) as raised:
        await keeper.run(user, Call(error))
    assert raised.value is error
    assert store.provisioned == [user.user_id]


async def test_nothing_is_provisioned_while_the_backend_is_unavailable(
    keeper: ProfileKeeper, store: RecordingProfileStore
) -> None:
    user = a_user()
    with pytest.raises(BackendUnavailable):
        await keeper.run(user, Call(BackendUnavailable()))
    assert store.provisioned == []
    await keeper.run(user, Call("ok"))  # not remembered as known: the next call provisions
    assert store.provisioned == [user.user_id]


async def test_nothing_is_provisioned_for_a_cancelled_call(
    keeper: ProfileKeeper, store: RecordingProfileStore
) -> None:
    with pytest.raises(asyncio.CancelledError):
        await keeper.run(a_user(), Call(asyncio.CancelledError()))
    assert store.provisioned == []


async def test_a_users_missing_profile_is_their_own_whoever_it_names(
    keeper: ProfileKeeper, store: RecordingProfileStore
) -> None:
    user, call = a_user(), Call(ProfileNotFound(user_id=uuid.uuid4()), "ok")
    assert await keeper.run(user, call) == "ok"
    assert store.provisioned == [user.user_id]
    assert store.provisioned_known == []


@pytest.mark.parametrize(
    "outcome",
    ["ok", ProfileNotFound(), InsufficientCredits(1, 0)],
    ids=["success", "profile not found naming nobody", "business error"],
)
async def test_a_service_never_gets_a_profile_of_its_own(
    keeper: ProfileKeeper, store: RecordingProfileStore, outcome: object
) -> None:
    call = Call(outcome)
    if isinstance(outcome, Exception):
        with pytest.raises(type(outcome)) as raised:
            await keeper.run(SERVICE, call)
        assert raised.value is outcome
    else:
        assert await keeper.run(SERVICE, call) == outcome
    assert call.runs == 1
    assert store.provisioned == store.provisioned_known == []


async def test_settle_never_provisions_a_service(
    keeper: ProfileKeeper, store: RecordingProfileStore
) -> None:
    await keeper.settle(SERVICE)
    assert store.provisioned == store.provisioned_known == []


async def test_a_services_call_for_a_known_user_makes_their_profile_and_runs_again(
    keeper: ProfileKeeper, store: RecordingProfileStore
) -> None:
    user_id = uuid.uuid4()
    store.known.add(user_id)
    call = Call(ProfileNotFound(user_id=user_id), "granted")
    assert await keeper.run(SERVICE, call) == "granted"
    assert call.runs == 2
    assert store.provisioned_known == [user_id]
    assert store.provisioned == []


async def test_a_services_call_for_an_unknown_user_keeps_its_profile_not_found(
    keeper: ProfileKeeper, store: RecordingProfileStore
) -> None:
    user_id = uuid.uuid4()
    missing = ProfileNotFound(user_id=user_id)
    call = Call(missing, "never")
    with pytest.raises(ProfileNotFound) as raised:
        await keeper.run(SERVICE, call)
    assert raised.value is missing  # the call's error, naming the user, not provisioning's
    assert raised.value.metadata == {"user_id": str(user_id)}
    assert call.runs == 1
    assert store.provisioned_known == [user_id]


@pytest.mark.parametrize(
    "failure", [BackendUnavailable(), AccessDeniedByPolicy()], ids=["unavailable", "refused"]
)
async def test_a_provisioning_failure_is_logged_and_leaves_the_calls_result(
    keeper: ProfileKeeper,
    store: RecordingProfileStore,
    caplog: pytest.LogCaptureFixture,
    failure: CreditsError,
) -> None:
    user = a_user()
    store.error = failure
    with caplog.at_level(logging.WARNING, logger="server.credit.profiles"):
        assert await keeper.run(user, Call("ok")) == "ok"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert str(user.user_id) in caplog.records[0].getMessage()
    assert failure.reason in caplog.records[0].getMessage()

    error = InsufficientCredits(required=5, available=0)
    with pytest.raises(InsufficientCredits) as raised:  # a failed call keeps its own error
        await keeper.run(user, Call(error))
    assert raised.value is error

    store.error = None  # not remembered as known: the next call tries again
    await keeper.run(user, Call("ok"))
    assert store.provisioned == [user.user_id] * 3


async def test_the_known_set_is_bounded_oldest_out_first(store: RecordingProfileStore) -> None:
    keeper = ProfileKeeper(store, capacity=2)
    first, second, third = a_user(), a_user(), a_user()
    for user in (first, second, third):
        await keeper.run(user, Call("ok"))
    await keeper.run(third, Call("ok"))  # still known
    await keeper.run(second, Call("ok"))  # still known
    assert store.provisioned == [first.user_id, second.user_id, third.user_id]
    await keeper.run(first, Call("ok"))  # evicted: made sure of again
    assert store.provisioned[-1] == first.user_id
    assert len(store.provisioned) == 4
