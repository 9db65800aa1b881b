"""A service may act for a user the identity provider knows (auth.users) before that user's
first call: the profile is made then, signup credits included, once. A user id auth.users does
not know stays PROFILE_NOT_FOUND. The optional signup trigger makes the profile at signup.

Signup credits are a setting of the whole database, so these tests run servers of their own on
a fresh database, over both transports."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from importlib import resources

import asyncpg
import grpc
import grpc.aio
import pytest

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, ledger_pb2
from server import app as application
from server.db.migrate import migrate
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.errors import failure
from tests.fixtures.server import SERVICE, TEST_JWT_SECRET, TRANSPORTS, new_user, settings_for

SIGNUP = 5
Stub = credit_service_pb2_grpc.CreditServiceStub


@pytest.fixture(params=TRANSPORTS)
async def signup_server(
    request: pytest.FixtureRequest, fresh_database_url: str
) -> AsyncIterator[tuple[Stub, str]]:
    """A server granting SIGNUP credits to new profiles, on a database of its own, and that
    database's URL."""
    await migrate(fresh_database_url)
    fake = await FakeSupabase.start(fresh_database_url, jwt_secret=TEST_JWT_SECRET)
    settings = settings_for(request.param, fresh_database_url, fake)
    app = await application.start(dataclasses.replace(settings, signup_credits=SIGNUP))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield Stub(channel), fresh_database_url
    finally:
        await app.stop(grace=1)
        await fake.stop()


async def sign_up(database_url: str, user_id: uuid.UUID, email: str) -> None:
    """What Supabase Auth does at signup: a row in auth.users."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("insert into auth.users (id, email) values ($1, $2)", user_id, email)
    finally:
        await conn.close()


def grant(user_id: uuid.UUID, amount: int, key: str) -> pb.GrantCreditsRequest:
    return pb.GrantCreditsRequest(user_id=str(user_id), amount=amount, idempotency_key=key)


async def test_a_service_grant_provisions_a_user_auth_knows(
    signup_server: tuple[Stub, str],
) -> None:
    credits, database_url = signup_server
    user = new_user()
    await sign_up(database_url, user.id, "ada@example.com")

    reply = await credits.GrantCredits(grant(user.id, 100, "paid-1"), metadata=SERVICE)
    assert reply.balance == SIGNUP + 100

    profile = (await credits.GetProfile(pb.GetProfileRequest(), metadata=user.metadata)).profile
    assert (profile.email, profile.balance) == ("ada@example.com", SIGNUP + 100)
    page = await credits.ListTransactions(pb.ListTransactionsRequest(), metadata=user.metadata)
    assert sorted((t.kind, t.amount) for t in page.transactions) == [
        (ledger_pb2.TRANSACTION_KIND_GRANT, SIGNUP),
        (ledger_pb2.TRANSACTION_KIND_GRANT, 100),
    ]


async def test_concurrent_service_calls_grant_signup_credits_once(
    signup_server: tuple[Stub, str],
) -> None:
    credits, database_url = signup_server
    user = new_user()
    await sign_up(database_url, user.id, "")
    replies = await asyncio.gather(
        *(credits.GrantCredits(grant(user.id, 1, f"k-{i}"), metadata=SERVICE) for i in range(10))
    )
    assert max(r.balance for r in replies) == SIGNUP + 10
    balance = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert balance.balance == SIGNUP + 10


async def test_a_service_read_provisions_too(signup_server: tuple[Stub, str]) -> None:
    credits, database_url = signup_server
    user = new_user()
    await sign_up(database_url, user.id, "")
    reply = await credits.GetBalance(pb.GetBalanceRequest(user_id=user.user_id), metadata=SERVICE)
    assert (reply.user_id, reply.balance) == (user.user_id, SIGNUP)


async def test_a_user_auth_does_not_know_stays_not_found(
    signup_server: tuple[Stub, str],
) -> None:
    credits, _ = signup_server
    stranger = uuid.uuid4()
    for call in (
        credits.GrantCredits(grant(stranger, 5, "k"), metadata=SERVICE),
        credits.GetBalance(pb.GetBalanceRequest(user_id=str(stranger)), metadata=SERVICE),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        found = failure(raised.value)
        assert (found.code, found.reason) == (grpc.StatusCode.NOT_FOUND, "PROFILE_NOT_FOUND")
        assert found.metadata == {"user_id": str(stranger)}


async def test_the_optional_signup_trigger_makes_the_profile_at_signup(
    fresh_database_url: str,
) -> None:
    await migrate(fresh_database_url)
    trigger = resources.files("server.db") / "optional" / "credits_signup_trigger.sql"
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute("select public.credit_configure($1)", SIGNUP)
        await conn.execute(trigger.read_text(encoding="utf-8"))
        user_id = uuid.uuid4()
        await sign_up(fresh_database_url, user_id, "grace@example.com")
        profile = await conn.fetchrow(
            "select email, balance from public.credit_profiles where user_id = $1", user_id
        )
        assert (profile["email"], profile["balance"]) == ("grace@example.com", SIGNUP)
        # Provisioning later (a first call) changes nothing: signup credits come once.
        await conn.execute("select public.credit_provision_profile($1, 'x')", user_id)
        await conn.execute("select public.credit_provision_known_user($1)", user_id)
        grants = await conn.fetchval(
            "select count(*) from public.credit_transactions where user_id = $1", user_id
        )
        assert grants == 1
    finally:
        await conn.close()
