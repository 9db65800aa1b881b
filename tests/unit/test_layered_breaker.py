"""LayeredRepository over a fake Transport: the service layer first, the user's own JWT only when
the service credentials are refused, and the breaker that remembers the refusal for a while."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from server.auth.principal import Principal, ServicePrincipal, UserPrincipal
from server.errors import (
    BackendUnavailable,
    CreditsError,
    InsufficientCredits,
    ProfileNotFound,
    ServiceCredentialsRejected,
)
from server.repository.breaker import CredentialBreaker
from server.repository.functions import SqlCall
from server.repository.layered import LayeredRepository
from server.repository.transport import CredentialsRejected

COOLDOWN = 30.0
USER = UserPrincipal(uuid.uuid4(), "u@example.com", token="jwt", claims={})
SERVICE = ServicePrincipal()


class Echo(SqlCall[str], function="test_echo"):
    """A call whose result shows it went through its own `decode`."""

    value: str

    def decode(self, raw: Any) -> str:
        return f"decoded({raw})"


class ForUser(SqlCall[str], function="test_for_user"):
    """A call about a user (as GetProfile, Debit, ...)."""

    user_id: uuid.UUID

    def decode(self, raw: Any) -> str:
        return str(raw)


class FakeSession:
    """A fake Session: answers with the call's value and who answered, or raises `error`."""

    def __init__(self, layer: str, log: list[str], error: Exception | None = None) -> None:
        self.layer = layer
        self.log = log
        self.error = error

    async def call(self, call: SqlCall[Any]) -> Any:
        self.log.append(self.layer)
        if self.error is not None:
            raise self.error
        return f"{self.layer}:{getattr(call, 'value', '')}"


class FakeTransport:
    """A fake Transport: a service session (refusing its credentials when `service_error` is
    CredentialsRejected) and user sessions; `log` names the layer of every call made."""

    def __init__(self, service_error: Exception | None = None) -> None:
        self.log: list[str] = []
        self.service_error = service_error
        self.users: list[UserPrincipal] = []

    def service(self) -> FakeSession:
        return FakeSession("service", self.log, self.service_error)

    def as_user(self, principal: UserPrincipal) -> FakeSession:
        self.users.append(principal)
        return FakeSession("user", self.log)

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock: Clock) -> CredentialBreaker:
    return CredentialBreaker(cooldown=COOLDOWN, clock=clock)


def layers(transport: FakeTransport, breaker: CredentialBreaker) -> LayeredRepository:
    return LayeredRepository(transport, breaker)


async def test_the_service_layer_answers_when_it_accepts(breaker: CredentialBreaker) -> None:
    transport = FakeTransport()
    for principal in (USER, SERVICE):
        assert await layers(transport, breaker).call(principal, Echo("x")) == "decoded(service:x)"
    assert transport.log == ["service", "service"]
    assert not breaker.is_open


async def test_a_users_call_falls_back_to_their_own_layer(breaker: CredentialBreaker) -> None:
    transport = FakeTransport(CredentialsRejected("bad service key"))
    result = await layers(transport, breaker).call(USER, Echo("x"))
    assert result == "decoded(user:x)"
    assert transport.log == ["service", "user"]
    assert transport.users == [USER]
    assert breaker.is_open


async def test_a_service_has_no_layer_to_fall_back_to(breaker: CredentialBreaker) -> None:
    transport = FakeTransport(CredentialsRejected("bad service key"))
    with pytest.raises(ServiceCredentialsRejected):
        await layers(transport, breaker).call(SERVICE, Echo("x"))
    assert transport.log == ["service"]
    assert breaker.is_open


async def test_the_open_breaker_skips_the_service_layer_until_its_cooldown_ends(
    breaker: CredentialBreaker, clock: Clock
) -> None:
    transport = FakeTransport(CredentialsRejected("bad service key"))
    repository = layers(transport, breaker)
    await repository.call(USER, Echo("1"))
    assert transport.log == ["service", "user"]

    clock.now += COOLDOWN - 1
    assert await repository.call(USER, Echo("2")) == "decoded(user:2)"
    assert transport.log == ["service", "user", "user"]  # no refused round trip
    with pytest.raises(ServiceCredentialsRejected):  # nor for a service, while open
        await repository.call(SERVICE, Echo("3"))
    assert transport.log == ["service", "user", "user"]

    clock.now += 1
    assert not breaker.is_open
    transport.service_error = None  # the key was fixed meanwhile
    assert await repository.call(USER, Echo("4")) == "decoded(service:4)"
    assert transport.log[-1] == "service"


async def test_a_refusal_after_the_cooldown_opens_the_breaker_again(
    breaker: CredentialBreaker, clock: Clock
) -> None:
    transport = FakeTransport(CredentialsRejected("bad service key"))
    repository = layers(transport, breaker)
    await repository.call(USER, Echo("1"))
    clock.now += COOLDOWN
    await repository.call(USER, Echo("2"))
    assert transport.log == ["service", "user", "service", "user"]
    assert breaker.is_open


@pytest.mark.parametrize(
    "error",
    [InsufficientCredits(required=5, available=1), BackendUnavailable()],
    ids=["business error", "backend unavailable"],
)
@pytest.mark.parametrize("principal", [USER, SERVICE], ids=["user", "service"])
async def test_other_errors_never_fall_back(
    breaker: CredentialBreaker, error: CreditsError, principal: Principal
) -> None:
    transport = FakeTransport(error)
    with pytest.raises(type(error)) as raised:
        await layers(transport, breaker).call(principal, Echo("x"))
    assert raised.value is error
    assert transport.log == ["service"]
    assert not breaker.is_open


async def test_call_as_service_never_uses_the_user_layer(breaker: CredentialBreaker) -> None:
    transport = FakeTransport(CredentialsRejected("bad service key"))
    repository = layers(transport, breaker)
    with pytest.raises(ServiceCredentialsRejected):
        await repository.call_as_service(Echo("x"))
    assert transport.log == ["service"]
    assert transport.users == []
    assert breaker.is_open


async def test_call_as_service_tries_the_service_layer_even_with_the_breaker_open(
    breaker: CredentialBreaker,
) -> None:
    breaker.trip("refused earlier")
    transport = FakeTransport()
    assert await layers(transport, breaker).call_as_service(Echo("x")) == "decoded(service:x)"
    assert transport.log == ["service"]


async def test_a_missing_profile_is_reported_with_the_user_the_call_was_about(
    breaker: CredentialBreaker,
) -> None:
    user_id = uuid.uuid4()
    with pytest.raises(ProfileNotFound) as named:
        await layers(FakeTransport(ProfileNotFound()), breaker).call(SERVICE, ForUser(user_id))
    assert named.value.user_id == user_id
    assert named.value.metadata == {"user_id": str(user_id)}
    with pytest.raises(ProfileNotFound) as unnamed:  # a call about no user names nobody
        await layers(FakeTransport(ProfileNotFound()), breaker).call(SERVICE, Echo("x"))
    assert unnamed.value.user_id is None
