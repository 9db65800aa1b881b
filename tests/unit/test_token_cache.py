"""The verified-token cache: answers only for the same token, never past its expiry or maximum
age, stays within its size, and the verifier fills it only with tokens that verified."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from server import errors
from server.auth.cache import VerifiedTokens
from server.auth.principal import ServicePrincipal, UserPrincipal
from server.auth.tokens import mint_user_token
from server.auth.verifier import TokenVerifier

SECRET = "token-cache-test-secret-" + "y" * 40


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def user(n: int = 1) -> UserPrincipal:
    return UserPrincipal(uuid.UUID(int=n), "", token=f"t{n}", claims={})


def test_a_token_is_answered_until_it_expires() -> None:
    clock = Clock()
    cache = VerifiedTokens(clock=clock)
    principal = user()
    cache.put("token-a", principal, expires_at=clock.now + 60)
    assert cache.get("token-a") is principal
    assert cache.get("token-b") is None
    clock.now += 59.9
    assert cache.get("token-a") is principal
    clock.now += 0.1
    assert cache.get("token-a") is None
    assert len(cache) == 0


def test_no_entry_outlives_the_maximum_age() -> None:
    clock = Clock()
    cache = VerifiedTokens(max_age=30, clock=clock)
    cache.put("token", user(), expires_at=clock.now + 3600)
    clock.now += 29
    assert cache.get("token") is not None
    clock.now += 1
    assert cache.get("token") is None


def test_an_expired_token_is_not_kept() -> None:
    clock = Clock()
    cache = VerifiedTokens(clock=clock)
    cache.put("token", user(), expires_at=clock.now - 1)
    assert cache.get("token") is None
    assert len(cache) == 0


def test_a_full_cache_drops_the_entries_nearest_to_expiry() -> None:
    clock = Clock()
    cache = VerifiedTokens(max_entries=3, clock=clock)
    for n, lifetime in enumerate((50, 10, 40, 30)):
        cache.put(f"token-{n}", user(n), expires_at=clock.now + lifetime)
    assert len(cache) == 3
    assert cache.get("token-1") is None  # the soonest to expire made room
    assert all(cache.get(f"token-{n}") is not None for n in (0, 2, 3))


def test_a_token_put_again_keeps_its_newest_entry() -> None:
    clock = Clock()
    cache = VerifiedTokens(max_entries=2, clock=clock)
    cache.put("token", user(1), expires_at=clock.now + 10)
    cache.put("token", user(2), expires_at=clock.now + 100)
    cache.put("other", user(3), expires_at=clock.now + 50)
    # The stale deadline of "token" went first and did not take its newer entry with it.
    assert cache.get("token") == user(2)
    assert cache.get("other") == user(3)


async def test_the_verifier_remembers_tokens_that_verified() -> None:
    cache = VerifiedTokens()
    verifier = TokenVerifier(hs256_secret=SECRET, cache=cache)
    token = mint_user_token(SECRET, uuid.uuid4())
    first = await verifier.verify(token)
    assert isinstance(first, UserPrincipal)
    assert cache.get(token) is first
    assert await verifier.verify(token) is first


async def test_the_verifier_never_caches_a_rejected_token() -> None:
    cache = VerifiedTokens()
    verifier = TokenVerifier(hs256_secret=SECRET, cache=cache)
    expired = mint_user_token(SECRET, uuid.uuid4(), ttl=timedelta(minutes=-5))
    forged = mint_user_token("another-secret-" + "z" * 40, uuid.uuid4())
    for _ in range(2):
        with pytest.raises(errors.TokenExpired):
            await verifier.verify(expired)
        with pytest.raises(errors.TokenInvalid):
            await verifier.verify(forged)
    assert len(cache) == 0


async def test_the_cache_is_per_verifier_configuration() -> None:
    # A token one verifier accepted says nothing to a verifier with another secret.
    token = mint_user_token(SECRET, uuid.uuid4())
    await TokenVerifier(hs256_secret=SECRET).verify(token)
    with pytest.raises(errors.TokenInvalid):
        await TokenVerifier(hs256_secret="a-different-secret-" + "q" * 40).verify(token)
    assert isinstance(
        await TokenVerifier(hs256_secret=SECRET, service_keys=["k"]).verify("k"), ServicePrincipal
    )
